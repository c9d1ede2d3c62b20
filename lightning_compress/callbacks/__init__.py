"""Lightning callbacks: thin glue that decides *when* the functions of :mod:`lightning_compress.core` run."""
