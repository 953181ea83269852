"""Read-path benchmark of cloudfs: ``python -m bench`` (see bench/README.md).

One run measures, against the same S3 endpoint and the same bytes:

* the endpoint's own limits with raw boto3 (one stream, and eight parallel ranged GETs),
* cloudfs mounted on it: cold sequential, first read from the disk block cache after a remount,
  warm re-read from the kernel page cache, and random 64 KiB reads cold and warm,
* the ceiling of a Python (pyfuse3) filesystem on this machine: a no-op filesystem serving the
  file from memory, at the kernel's default read-ahead and at 1 MiB,
* a plain local-disk read of the same bytes for reference.

``python -m bench write`` (``bench/write.py``) measures the write path the same way: a large file
written with ``dd conv=fsync`` and a PACS-like ingest of small files with ``fdatasync``, through
cloudfs and to the local disk, the time until the bucket has them, and the endpoint's raw upload
speed with boto3.

``python -m bench viewer`` (``bench/viewer.py``) measures a radiologist's viewer reading a cold
CT series instance by instance through cloudfs, with study prefetch on and off, beside boto3
fetching the same series with one reader and with eight, and the same series again from cloudfs's
caches.

Each figure only means something next to the one that bounds it, so the report gives ratios
(cloudfs cold / the endpoint's parallel limit, cloudfs cached / the FUSE ceiling) as well as the
absolute numbers.
"""
