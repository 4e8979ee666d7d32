"""Open a runtime Session for an artifact directory (dispatch on the manifest's format)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from edgeq.artifact import read_manifest
from edgeq.errors import EdgeqError

RUNTIMES = ("auto", "llamacpp", "reference")


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, int(os.environ.get("EDGEQ_THREADS", "0")) or (os.cpu_count() or 1)))


def open_session(artifact_dir: str | Path, runtime: str = "auto", n_ctx: int = 2048, threads: int | None = None,
                 manifest: dict | None = None):
    root = Path(artifact_dir)
    m = manifest or read_manifest(root)
    if runtime not in RUNTIMES:
        raise EdgeqError(f"unknown runtime {runtime!r} (available: {', '.join(RUNTIMES)})")
    fmt = m.get("format")
    if fmt != "gguf":
        raise EdgeqError(f"{root}: unsupported artifact format {fmt!r}")
    model = root / m["model_file"]
    if runtime in ("auto", "llamacpp"):
        from runtimes.llamacpp import LlamaCppSession

        return LlamaCppSession(model, lora_paths=[root / f for f in m.get("adapter_files", [])],
                               n_ctx=n_ctx, n_threads=threads or default_threads())
    from runtimes.reference import ReferenceSession

    if m.get("adapter_files"):
        raise EdgeqError("the reference runtime does not load separate LoRA-adapter GGUFs; "
                         "use --runtime llamacpp or build with --adapter-mode merge")
    from edgeq.lower.gguf import read_gguf

    return ReferenceSession(read_gguf(model), n_ctx=n_ctx)


def manifest_summary(m: dict) -> str:
    return json.dumps({k: m.get(k) for k in ("format", "target", "weight_type", "bits")})
