"""`edgeq build`: model (+ adapters) -> verified artifact directory, atomically."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgeq import goldens
from edgeq.artifact import GOLDENS, atomic_directory, dump_json, write_manifest
from edgeq.errors import EdgeqError
from edgeq.frontend import load_adapter, load_model, merge_adapters
from edgeq.ir import ModelIR, Role, linear_name
from edgeq.targets import TargetProfile, load_target

FORMATS = ("gguf",)
MODEL_FILE = "model.gguf"


@dataclass(frozen=True)
class BuildOptions:
    model: Path
    out: Path
    target: str = "cpu-avx2"
    format: str = "gguf"
    bits: int | None = None  # None: the target profile's default
    qtype: str | None = None  # explicit base weight type (overrides bits), e.g. "Q4_1"
    adapters: tuple[Path, ...] = ()
    adapter_mode: str = "merge"  # merge | separate
    force: bool = False
    record_goldens: bool = True

    def to_json(self) -> dict:
        return {"target": self.target, "format": self.format, "bits": self.bits, "qtype": self.qtype,
                "adapter_mode": self.adapter_mode, "adapters": [p.name for p in self.adapters]}


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def _log(msg: str) -> None:
    import click

    click.echo(msg, err=True)


def prepare_ir(opts: BuildOptions, log: Callable[[str], None] = _log) -> ModelIR:
    """Front end: load the model, attach adapters, merge them if asked."""
    log(f"loading {opts.model}")
    ir = load_model(opts.model)
    for path in opts.adapters:
        log(f"loading adapter {path}")
        ir = load_adapter(ir, path)
    if opts.adapter_mode == "merge" and opts.adapters:
        ir = merge_adapters(ir)
    return ir


def check_options(opts: BuildOptions, target: TargetProfile) -> None:
    if opts.format not in FORMATS:
        raise EdgeqError(f"unknown format {opts.format!r} (available: {', '.join(FORMATS)})")
    if opts.format not in target.formats:
        raise EdgeqError(f"target {target.name} does not run {opts.format} artifacts "
                         f"(it runs: {', '.join(target.formats)})")
    if opts.adapter_mode not in ("merge", "separate"):
        raise EdgeqError(f"unknown adapter mode {opts.adapter_mode!r} (merge or separate)")
    if opts.bits is not None and opts.bits not in (4, 8, 16, 32):
        raise EdgeqError(f"unsupported --bits {opts.bits} (4, 8, 16 or 32)")


def build(opts: BuildOptions, log: Callable[[str], None] = _log) -> BuildResult:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    target = load_target(opts.target)
    check_options(opts, target)
    bits = opts.bits if opts.bits is not None else target.default_bits
    from edgeq.lower import gguf as lower_gguf

    t = time.perf_counter()
    ir = prepare_ir(opts, log)
    timings["load"] = time.perf_counter() - t
    # separate adapters are written as their own files; the base file holds no branches
    problems = lower_gguf.check(ir.without_low_rank() if opts.adapter_mode == "separate" else ir)
    if problems:
        raise EdgeqError(f"cannot lower to gguf: {problems[0]}")
    types = lower_gguf.tensor_types(ir, opts.qtype or bits)
    base_qtype = types[linear_name(0, Role.Q)].value
    with atomic_directory(opts.out, force=opts.force) as tmp:
        t = time.perf_counter()
        log(f"writing {MODEL_FILE} ({base_qtype}) for target {target.name}")
        lower_gguf.write_gguf(ir, tmp / MODEL_FILE, types, allow_low_rank=opts.adapter_mode == "separate", progress=True)
        adapter_files = []
        if opts.adapter_mode == "separate":
            for name in ir.adapters:
                fname = f"adapter-{name}.gguf"
                log(f"writing LoRA adapter {fname}")
                lower_gguf.write_lora_gguf(ir, name, tmp / fname)
                adapter_files.append(fname)
        timings["lower"] = time.perf_counter() - t
        manifest = {
            "format": "gguf",
            "runtime": "llamacpp",
            "target": target.name,
            "model_file": MODEL_FILE,
            "adapter_files": adapter_files,
            "weight_type": base_qtype,
            "bits": bits,
            "tensor_types": {k: v.value for k, v in sorted(types.items())},
            "options": opts.to_json(),
            "source": dict(ir.source),
            "adapters": {k: dict(v) for k, v in ir.adapters.items()},
            "hparams": ir.hparams.to_json(),
            "history": [{"name": r.name, "options": dict(r.options)} for r in ir.history],
        }
        if opts.record_goldens:
            t = time.perf_counter()
            log("recording goldens (fp32 reference and the artifact)")
            manifest["goldens"] = record_goldens(ir, tmp, adapter_files)
            timings["goldens"] = time.perf_counter() - t
        manifest = write_manifest(tmp, manifest)
    total = time.perf_counter() - t_start
    return BuildResult(out=Path(opts.out), manifest=manifest, seconds=total, timings=timings)


def record_goldens(ir: ModelIR, root: Path, adapter_files: list[str]) -> dict:
    from runtimes.llamacpp import LlamaCppSession
    from runtimes.reference import ReferenceSession

    ref = ReferenceSession(ir, n_ctx=256, dtype=np.float64)  # the oracle: float64 accumulation
    token_ids = goldens.golden_token_ids(ref)
    data = {"prompts": list(goldens.GOLDEN_PROMPTS), "token_ids": token_ids,
            "reference": goldens.record(ref, token_ids)}
    del ref
    with LlamaCppSession(root / MODEL_FILE, lora_paths=[root / f for f in adapter_files], n_ctx=256) as art:
        data["artifact"] = goldens.record(art, token_ids)
    dump_json(data, root / GOLDENS)
    return {"file": GOLDENS, "positions": sum(len(t) for t in token_ids), "topk": goldens.GOLDEN_TOPK}
