"""The layering rules of docs/design.md, checked on the source: imports point one way."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cloudfs"


def imports_of(path: Path) -> set[str]:
    """Top-level module names and cloudfs-relative modules imported by one source file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.add("." + (node.module or ""))
            elif node.module:
                found.add(node.module.split(".")[0])
    return found


def modules() -> dict[str, set[str]]:
    return {
        str(path.relative_to(PACKAGE)): imports_of(path) for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_only_fuse_ops_imports_pyfuse3() -> None:
    """The filesystem core is testable without a kernel: one module speaks FUSE."""
    assert {name for name, found in modules().items() if "pyfuse3" in found} == {"fuse_ops.py"}


def test_only_the_s3_store_imports_boto() -> None:
    """Transport stays behind the ObjectStore protocol."""
    users = {name for name, found in modules().items() if found & {"boto3", "botocore"}}
    assert users == {"store/s3.py"}


def test_lower_layers_do_not_import_upper_ones() -> None:
    """The cache, read-ahead logic, catalog and stores know nothing of FUSE or the filesystem."""
    upper = {".fs", ".fuse_ops", ".mount", ".cli", ".reader", "..fs", "..reader"}
    for name in ("cache.py", "prefetch.py", "catalog.py", "store/local.py", "store/s3.py"):
        assert not modules()[name] & upper, name


def test_prefetch_is_pure_logic() -> None:
    """Read-ahead decisions import nothing: no clock, no I/O, trivially unit-testable."""
    assert modules()["prefetch.py"] <= {"__future__"}
