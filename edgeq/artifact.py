"""Artifact directories: manifest.json, payload files, goldens, the tokenizer spec file; atomic
creation; hashing. Part of the neutral core: the compiler writes these files, the device-side
runtimes read them (docs/architecture.md, "Layers")."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edgeq import __version__
from edgeq.errors import EdgeqError
from edgeq.hashing import sha256_file
from edgeq.ir import TokenizerSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GOLDENS = "goldens.json"


def dump_json(obj, path: Path) -> None:
    """Deterministic JSON (sorted keys, fixed separators, trailing newline)."""
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_file(path: Path, fill) -> None:
    """Run ``fill(tmp_path)`` then rename onto ``path``; never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fill(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``out_dir``; rename it into place on success.

    On any exception the temporary directory is removed and ``out_dir`` is left untouched.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not force:
        if not out.is_dir() or any(out.iterdir()):
            raise EdgeqError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _normalise_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normalise_modes(root: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give the artifact ordinary umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.iterdir():
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def file_table(root: Path) -> dict[str, dict]:
    """sha256 and size of every payload file (everything except the manifest)."""
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(root.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(root: Path, manifest: dict) -> dict:
    manifest = dict(manifest)
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["edgeq_version"] = __version__
    manifest["files"] = file_table(root)
    dump_json(manifest, root / MANIFEST)
    return manifest


def read_manifest(artifact_dir: str | Path) -> dict:
    root = Path(artifact_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise EdgeqError(f"{root}: not an artifact directory")
    if not path.exists():
        raise EdgeqError(f"{root}: no {MANIFEST} (not an edgeq artifact?)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgeqError(f"{path}: corrupt manifest ({exc.__class__.__name__})") from None
    if not isinstance(m, dict) or "schema_version" not in m:
        raise EdgeqError(f"{path}: not an edgeq manifest")
    if m["schema_version"] != SCHEMA_VERSION:
        raise EdgeqError(f"{path}: manifest schema {m['schema_version']} is not supported "
                         f"(this edgeq reads schema {SCHEMA_VERSION})")
    return m


def check_files(root: Path, manifest: dict) -> list[str]:
    """Problems with payload files: missing, extra, wrong size or hash."""
    problems = []
    listed = manifest.get("files", {})
    for name, info in sorted(listed.items()):
        p = root / name
        if not p.exists():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != info["bytes"]:
            problems.append(f"{name}: size {p.stat().st_size} != manifest {info['bytes']}")
        elif sha256_file(p) != info["sha256"]:
            problems.append(f"{name}: sha256 mismatch (file modified)")
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name != MANIFEST and p.name not in listed:
            problems.append(f"{p.name}: not listed in the manifest")
    return problems


def write_tokenizer_spec(spec: TokenizerSpec, path: Path) -> None:
    """The tokenizer spec as deterministic JSON (the ``tokenizer.spec.json`` of ONNX / TVM artifacts)."""
    dump_json(spec.to_json(), Path(path))


def read_tokenizer_spec(path: Path) -> TokenizerSpec:
    try:
        return TokenizerSpec.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise EdgeqError(f"{path}: unreadable tokenizer spec ({exc.__class__.__name__})") from None


# ---- the pruning rates a manifest carries ------------------------------------------------------

def rate_key(rate: float) -> str:
    return f"{float(rate):g}"


def artifact_rates(m: dict) -> tuple[float, ...]:
    p = m.get("prune")
    return tuple(float(r) for r in p["rates"]) if p else (0.0,)


def check_rate(m: dict, rate: float) -> None:
    rates = artifact_rates(m)
    if not any(abs(rate - r) < 1e-9 for r in rates):
        raise EdgeqError(f"pruning rate {rate:g} is not carried by this artifact "
                         f"(available: {', '.join(rate_key(r) for r in rates)})")


def gguf_file_for_rate(m: dict, rate: float) -> str:
    check_rate(m, rate)
    p = m.get("prune")
    return p["files"][rate_key(rate)] if p else m["model_file"]
