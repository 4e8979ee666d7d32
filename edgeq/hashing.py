"""Content hashes used in manifests."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_dir(path: str | Path, patterns: tuple[str, ...] = ("*",)) -> dict[str, str]:
    """sha256 of each regular file directly in ``path`` matching any pattern, sorted by name."""
    p = Path(path)
    files = sorted({f for pat in patterns for f in p.glob(pat) if f.is_file()})
    return {f.name: sha256_file(f) for f in files}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
