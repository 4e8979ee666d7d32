"""Open a runtime Session for an artifact directory (the manifest's format names its backend)."""
from __future__ import annotations

import os
from pathlib import Path

from edgeq.artifact import artifact_rates, check_rate, gguf_file_for_rate, rate_key, read_manifest  # noqa: F401 (re-exported)
from edgeq.backends import find, runtimes
from edgeq.errors import EdgeqError

RUNTIMES = runtimes()  # "auto" + every backend's runtimes


def default_threads() -> int:
    return int(os.environ.get("EDGEQ_THREADS", "0")) or (os.cpu_count() or 1)


def open_session(artifact_dir: str | Path, runtime: str = "auto", n_ctx: int = 2048, threads: int | None = None,
                 manifest: dict | None = None, prune: float | None = None, options: dict | None = None):
    """A Session on the artifact; ``prune`` selects a carried pruning rate (default 0); ``options``:
    runtime settings recorded with the goldens (see ``Backend.golden_options``)."""
    root = Path(artifact_dir)
    m = manifest or read_manifest(root)
    if runtime not in RUNTIMES:
        raise EdgeqError(f"unknown runtime {runtime!r} (available: {', '.join(RUNTIMES)})")
    rate = 0.0 if prune is None else float(prune)
    backend = find(m.get("format"))
    if backend is None:
        raise EdgeqError(f"{root}: unsupported artifact format {m.get('format')!r}")
    backend.check_runtime(runtime)
    return backend.open_session(root, m, runtime, n_ctx=n_ctx, threads=threads or default_threads(), rate=rate,
                                options=options)
