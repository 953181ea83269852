"""The embedded default archive: sample files generated once, so a first mount needs no cloud."""

from __future__ import annotations

import random
from pathlib import Path

_README = """\
This is the cloudfs demo archive, a local directory served as if it were an S3 bucket.

Every file you read here goes through the cloudfs block cache: the first read fetches blocks
from the archive, later reads come from the cache (see `cloudfs status MOUNTPOINT`).

  series/   a series of 120 images of 512 KiB, the size of a typical CT slice
  volume/   one 256 MiB file, for sequential reads (try: dd if=volume/volume.raw of=/dev/null bs=1M)
  reports/  small text files
"""


def generate_samples(archive: Path) -> int:
    """Create the sample tree under ``archive`` if it is not there; return how many files."""
    marker = archive / "README.txt"
    if marker.exists():
        return 0
    rng = random.Random(20261123)
    files: dict[str, list[bytes]] = {}
    for number in range(1, 121):
        files[f"series/image-{number:04d}.raw"] = [rng.randbytes(512 * 1024)]
    files["volume/volume.raw"] = [rng.randbytes(1024 * 1024) for _ in range(256)]
    for number in range(1, 6):
        files[f"reports/report-{number}.txt"] = [f"Sample report {number}\n".encode() * 40]
    for name, chunks in files.items():
        path = archive / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as out:
            out.writelines(chunks)
    # Written last: its presence means the archive is complete.
    marker.write_text(_README)
    return len(files) + 1
