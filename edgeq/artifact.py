"""Artifact directories: manifest.json, payload files, goldens, the tokenizer spec file; atomic
creation; hashing. Part of the neutral core: the compiler writes these files, the device-side
runtimes read them (docs/architecture.md, "Layers")."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

from edgeq import __version__
from edgeq.errors import EdgeqError
from edgeq.hashing import sha256_file
from edgeq.interrupts import deferred_signals, make_temp_dir, make_temp_file
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
    tmp = make_temp_file(f".{path.name}.", ".tmp", path.parent)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
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
    tmp = make_temp_file(f".{path.name}.", ".tmp", path.parent)
    try:
        fill(tmp)
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
    tmp = None
    try:
        tmp = make_temp_dir(f".{out.name}.tmp-", out.parent)
        yield tmp
        _normalise_modes(tmp)
        # The swap is one critical section: SIGINT / SIGTERM wait until it is over (an interrupt
        # between the two renames would leave no artifact at all), and concurrent builds into the
        # same parent take turns (a lock on the parent directory), so two builds racing for one
        # ``-o`` end with one artifact and, without --force, one clear error.
        with deferred_signals(), _locked(out.parent):
            if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
                raise EdgeqError(f"{out} was created by another process while this build ran; "
                                 "pass --force to replace it")
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.replace(out, old / "x")
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on ``directory`` (released when the block ends or the process dies)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
        raise EdgeqError(f"{path}: manifest schema {m['schema_version']!r} is not supported "
                         f"(this edgeq reads schema {SCHEMA_VERSION})")
    check_manifest_paths(root, m)
    _check_prune_section(path, m.get("prune"))
    return m


def _check_prune_section(path: Path, p) -> None:
    """``prune``: ``rates`` a non-empty list of finite numbers in [0, 1), ``files`` (when present)
    one file name per rate key."""
    if p is None:
        return
    rates = p.get("rates")
    if not isinstance(rates, list) or not rates or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r < 1 for r in rates):
        raise EdgeqError(f"{path}: prune.rates must be a non-empty list of rates in [0, 1)")
    files = p.get("files")
    if files is not None and (not isinstance(files, dict) or any(rate_key(r) not in files for r in rates)):
        raise EdgeqError(f"{path}: prune.files must name one file per rate")


def artifact_path(root: str | Path, name) -> Path:
    """``root / name`` for a file an artifact names, refused (EdgeqError) unless ``name`` is a
    plain relative path that stays inside ``root``: no absolute path or drive, no ``..``, no
    symlink (of the file or of a folder on the way) that resolves outside ``root``. Every open of
    a manifest-named file goes through here, so a hostile manifest cannot make a command read (or
    for a TVM artifact, load as code) a file elsewhere on the machine."""
    root = Path(root)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise EdgeqError(f"{root}: the manifest names a file {name!r}: not a file name; refusing it")
    parts = PurePosixPath(name).parts
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).root
            or "\\" in name or ".." in parts):
        raise EdgeqError(f"{root}: the manifest names {name!r}, a path outside the artifact directory; "
                         "refusing to open it")
    p = root / name
    real_root, real = root.resolve(), p.resolve()
    if real != real_root and real_root not in real.parents:
        raise EdgeqError(f"{root}: the manifest names {name!r}, which resolves outside the artifact directory "
                         f"(a symlink to {real}); refusing to open it")
    return p


def manifest_file_names(m: dict) -> list[str]:
    """Every file name a manifest refers to (its files table and each format's fields)."""
    names: list = []

    def add(v):
        if v is None:
            return
        if isinstance(v, dict):
            names.extend(v.values())
        elif isinstance(v, list):
            names.extend(v)
        else:
            names.append(v)

    def section(key):
        v = m.get(key)
        if v is not None and not isinstance(v, dict):
            raise EdgeqError(f"{key!r} is not a JSON object")
        return v or {}

    files = m.get("files", {})
    if not isinstance(files, dict):
        raise EdgeqError("'files' is not a JSON object")
    names.extend(files)
    for key in ("model_file", "adapter_files", "plan_file"):
        add(m.get(key))
    add(section("goldens").get("file"))
    add(section("prune").get("files"))
    for key in ("model_file", "data_file", "tokenizer_file", "tokenizer_vocab_file", "adapter_files"):
        add(section("onnx").get(key))
    for key in ("library", "weights_file", "tokenizer_file", "tokenizer_vocab_file"):
        add(section("tvm").get(key))
    return names


def check_manifest_paths(root: str | Path, m: dict) -> None:
    """Refuse a manifest naming any file outside ``root`` (see :func:`artifact_path`)."""
    try:
        names = manifest_file_names(m)
    except EdgeqError as exc:
        raise EdgeqError(f"{Path(root) / MANIFEST}: {exc}") from None
    for name in names:
        artifact_path(root, name)


def check_files(root: Path, manifest: dict) -> list[str]:
    """Problems with payload files: missing, extra, wrong size or hash."""
    problems = []
    listed = manifest.get("files", {})
    for name, info in sorted(listed.items()):
        p = artifact_path(root, name)
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int) or not isinstance(info.get("sha256"), str):
            problems.append(f"{name}: malformed manifest entry (expected sha256 and bytes)")
        elif not p.is_file():
            problems.append(f"{name}: missing" if not p.exists() else f"{name}: not a file")
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


_SPEC_FIELDS = {"tokenizer_json": (str,), "model": (str,), "pre": (str,), "tokens": (list,), "token_types": (list,),
                "merges": (list,), "bos_id": (int, None), "eos_id": (int, None), "pad_id": (int, None),
                "unk_id": (int, None), "add_bos": (bool,), "chat_template": (str, None)}
# written only for SentencePiece-style vocabularies (TokenizerSpec.to_json drops them when None)
_SPEC_OPTIONAL = {"scores": (list,), "add_space_prefix": (bool,)}


def read_tokenizer_spec(path: Path) -> TokenizerSpec:
    """The tokenizer spec file, its fields checked against the JSON types :func:`write_tokenizer_spec`
    writes (token ids within the vocabulary); anything else is one EdgeqError line."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise EdgeqError(f"{path}: unreadable tokenizer spec ({exc.__class__.__name__})") from None

    def bad(what: str):
        raise EdgeqError(f"{path}: corrupt tokenizer spec ({what})")

    if not isinstance(d, dict):
        bad("not a JSON object")
    if set(_SPEC_FIELDS) - set(d) or set(d) - set(_SPEC_FIELDS) - set(_SPEC_OPTIONAL):
        bad(f"fields {sorted((set(d) - set(_SPEC_OPTIONAL)) ^ set(_SPEC_FIELDS))[:3]} missing or unknown")
    for key, kinds in {**_SPEC_FIELDS, **{k: v for k, v in _SPEC_OPTIONAL.items() if k in d}}.items():
        v = d[key]
        ok = (v is None and None in kinds) or any(
            k is not None and isinstance(v, k) and not (k is int and isinstance(v, bool)) for k in kinds)
        if not ok:
            bad(f"{key} is a {type(v).__name__}")
    n = len(d["tokens"])
    if not all(isinstance(t, str) for t in d["tokens"]) or not all(isinstance(m, str) for m in d["merges"]):
        bad("tokens and merges must be strings")
    if len(d["token_types"]) != n or not all(isinstance(t, int) and not isinstance(t, bool) for t in d["token_types"]):
        bad("token_types must be one integer per token")
    if "scores" in d and (len(d["scores"]) != n or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in d["scores"])):
        bad("scores must be one number per token")
    for key in ("bos_id", "eos_id", "pad_id", "unk_id"):
        if d[key] is not None and not 0 <= d[key] < n:
            bad(f"{key} {d[key]} is not a token id (vocabulary of {n})")
    return TokenizerSpec.from_json(d)


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
    name = (p.get("files") or {}).get(rate_key(rate)) if p else m.get("model_file")
    if not isinstance(name, str):
        raise EdgeqError(f"the manifest names no model file for pruning rate {rate:g}")
    return name
