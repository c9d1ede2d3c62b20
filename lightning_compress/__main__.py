"""``python -m lightning_compress`` runs the ``lightning-compress`` command line."""

from lightning_compress.cli import main

if __name__ == "__main__":
    main()
