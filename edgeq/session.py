"""Open a runtime Session for an artifact directory (dispatch on the manifest's format)."""
from __future__ import annotations

import os
from pathlib import Path

from edgeq.artifact import artifact_path, read_manifest
from edgeq.errors import EdgeqError

RUNTIMES = ("auto", "llamacpp", "onnxruntime", "tvm", "reference")


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
    fmt = m.get("format")
    if fmt == "reference":
        if runtime == "llamacpp":
            raise EdgeqError("a reference artifact runs on the reference runtime only")
        from edgeq.lower.ir_files import META, WEIGHTS, read_ir
        from runtimes.reference import ReferenceSession

        check_rate(m, rate)
        for name in (WEIGHTS, META):  # fixed names, but either could be a symlink leaving the artifact
            artifact_path(root, name)
        s = ReferenceSession(read_ir(root), n_ctx=n_ctx)
        s.set_prune_rate(rate)
        return s
    if fmt == "onnx":
        if runtime not in ("auto", "onnxruntime"):
            raise EdgeqError("an onnx artifact runs on the onnxruntime runtime only")
        from runtimes.onnxrt import OnnxSession

        check_rate(m, rate)
        return OnnxSession(root, manifest=m, n_ctx=n_ctx, threads=threads or default_threads(), prune=rate)
    if fmt == "tvm":
        if runtime not in ("auto", "tvm"):
            raise EdgeqError("a tvm artifact runs on the tvm runtime only")
        from runtimes.tvmrt import TvmSession, runtime_only

        runtime_only()

        check_rate(m, rate)
        return TvmSession(root, manifest=m, n_ctx=n_ctx, threads=threads or default_threads(), prune=rate)
    if runtime in ("onnxruntime", "tvm"):
        raise EdgeqError(f"a {fmt} artifact does not run on {runtime}")
    if fmt != "gguf":
        raise EdgeqError(f"{root}: unsupported artifact format {fmt!r}")
    model = artifact_path(root, gguf_file_for_rate(m, rate))
    if runtime in ("auto", "llamacpp"):
        from runtimes.llamacpp import LlamaCppSession

        return LlamaCppSession(model, lora_paths=[artifact_path(root, f) for f in m.get("adapter_files", [])],
                               n_ctx=n_ctx, n_threads=threads or default_threads())
    from runtimes.reference import ReferenceSession

    if m.get("adapter_files"):
        raise EdgeqError("the reference runtime does not load separate LoRA-adapter GGUFs; "
                         "use --runtime llamacpp or build with --adapter-mode merge")
    from edgeq.lower.gguf import read_gguf

    return ReferenceSession(read_gguf(model), n_ctx=n_ctx)
