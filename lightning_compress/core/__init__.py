"""Pure-torch building blocks of lightning-compress.

Nothing in this package imports :mod:`lightning`; the callbacks in
:mod:`lightning_compress.callbacks` only decide *when* these functions run.
"""
