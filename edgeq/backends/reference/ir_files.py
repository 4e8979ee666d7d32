"""ModelIR <-> files: ``model.safetensors`` (every array) + ``model.json`` (everything else).

The payload of the ``reference`` artifact format, run by the numpy reference runtime, which can
switch pruning rates at run time. No pickle anywhere: arrays go through safetensors, the rest
through JSON. Deterministic: sorted keys, no timestamps.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.frontend.safetensors_io import read_safetensors
from edgeq.ir import HParams, Linear, LowRank, ModelIR, PassRecord, PruneSpec, Role, TokenizerSpec
from edgeq.safetensors_writer import save_streaming

WEIGHTS = "model.safetensors"
META = "model.json"
FORMAT_VERSION = 1


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def write_ir(ir: ModelIR, out_dir: str | Path) -> list[str]:
    """Write ``ir`` into ``out_dir``; returns the file names written."""
    out = Path(out_dir)
    arrays: dict[str, object] = {}  # name -> the IR's array (lazy ones stay in their file until written)
    linears = {}
    for name in sorted(ir.linears):
        lin = ir.linears[name]
        arrays[f"{name}.weight"] = lin.weight
        if lin.bias is not None:
            arrays[f"{name}.bias"] = lin.bias
        branches = []
        for k, lr in enumerate(lin.low_rank):
            arrays[f"{name}.lr{k}.a"] = lr.a
            arrays[f"{name}.lr{k}.b"] = lr.b
            branches.append({"scale": lr.scale, "source": lr.source})
        linears[name] = {"role": lin.role.value, "layer": lin.layer, "low_rank": branches}
    for name in sorted(ir.tensors):
        arrays[f"tensor.{name}"] = ir.tensors[name]
    for layer in sorted(ir.rope_index):
        arrays[f"rope_index.{layer}"] = np.asarray(ir.rope_index[layer], dtype=np.int64)
    # streamed: the header from shapes first, then one array (one row chunk of a lazy one) at a time
    save_streaming(out / WEIGHTS, {n: (a.dtype, a.shape) for n, a in arrays.items()}, arrays.__getitem__)
    tok = ir.tokenizer.to_json() if ir.tokenizer is not None else None
    meta = {
        "format_version": FORMAT_VERSION,
        "hparams": ir.hparams.to_json(),
        "linears": linears,
        "tokenizer": tok,
        "source": _jsonable(dict(ir.source)),
        "adapters": _jsonable({k: dict(v) for k, v in ir.adapters.items()}),
        "history": [{"name": r.name, "options": _jsonable(dict(r.options))} for r in ir.history],
        "prune": ir.prune.to_json() if ir.prune is not None else None,
    }
    (out / META).write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    return [WEIGHTS, META]


def read_ir(in_dir: str | Path) -> ModelIR:
    d = Path(in_dir)
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeqError(f"{d}: no {META}") from None
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"{d / META}: corrupt ({exc.msg})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise EdgeqError(f"{d / META}: unsupported format version {meta.get('format_version')}")
    arrays = read_safetensors(d / WEIGHTS)
    linears = {}
    for name, info in meta["linears"].items():
        branches = tuple(
            LowRank(a=arrays[f"{name}.lr{k}.a"], b=arrays[f"{name}.lr{k}.b"], scale=float(b["scale"]),
                    source=b["source"]) for k, b in enumerate(info["low_rank"]))
        linears[name] = Linear(name=name, role=Role(info["role"]), layer=int(info["layer"]),
                               weight=arrays[f"{name}.weight"], bias=arrays.get(f"{name}.bias"),
                               low_rank=branches)
    tensors = {k[len("tensor."):]: v for k, v in arrays.items() if k.startswith("tensor.")}
    rope_index = {int(k.split(".")[1]): v.astype(np.int64) for k, v in arrays.items() if k.startswith("rope_index.")}
    tok = meta.get("tokenizer")
    tokenizer = TokenizerSpec.from_json(tok) if tok is not None else None
    ir = ModelIR(
        hparams=HParams.from_json(meta["hparams"]),
        linears=linears,
        tensors=tensors,
        tokenizer=tokenizer,
        source=meta.get("source", {}),
        adapters=meta.get("adapters", {}),
        history=tuple(PassRecord(h["name"], h.get("options", {})) for h in meta.get("history", [])),
        rope_index=rope_index,
        prune=PruneSpec.from_json(meta["prune"]) if meta.get("prune") else None,
    )
    ir.validate()
    return ir
