"""Helpers of the release tests (tests/test_release.py, tests/pipeline/): the CLI in this process,
and artifact trees compared byte for byte. (Importable as ``release_trees``: tests/conftest.py
puts this directory on sys.path.)"""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from edgeq.cli import main


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def same_tree(a: Path, b: Path) -> None:
    """Every file of ``a`` and ``b`` (the same names) byte-identical."""
    fa, fb = tree_files(a), tree_files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs between {a} and {b}"


def leftovers(parent: Path) -> list[str]:
    """Hidden entries (temporary directories) under ``parent``."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]
