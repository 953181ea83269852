"""cloudfs: an S3 archive of medical images mounted as ordinary directories.

Layers (imports point one way): ``fuse_ops -> fs -> {catalog, reader -> cache, prefetch} -> store``.
"""

__version__ = "0.1.0"
