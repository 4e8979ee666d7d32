"""Open a runtime Session for an artifact directory (the manifest's format names its backend)."""
from __future__ import annotations

import os
from pathlib import Path

from edgeq.artifact import read_manifest
from edgeq.backends import find, runtimes
from edgeq.errors import EdgeqError

RUNTIMES = runtimes()  # "auto" + every backend's runtimes


def default_threads() -> int:
    return int(os.environ.get("EDGEQ_THREADS", "0")) or (os.cpu_count() or 1)


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


def open_session(artifact_dir: str | Path, runtime: str = "auto", n_ctx: int = 2048, threads: int | None = None,
                 manifest: dict | None = None, prune: float | None = None):
    """A Session on the artifact; ``prune`` selects a carried pruning rate (default 0)."""
    root = Path(artifact_dir)
    m = manifest or read_manifest(root)
    if runtime not in RUNTIMES:
        raise EdgeqError(f"unknown runtime {runtime!r} (available: {', '.join(RUNTIMES)})")
    rate = 0.0 if prune is None else float(prune)
    backend = find(m.get("format"))
    if backend is None:
        raise EdgeqError(f"{root}: unsupported artifact format {m.get('format')!r}")
    backend.check_runtime(runtime)
    return backend.open_session(root, m, runtime, n_ctx=n_ctx, threads=threads or default_threads(), rate=rate)
