"""ModelIR <-> files: ``model.safetensors`` (every array) + ``model.json`` (everything else).

The payload of the ``reference`` artifact format, run by the numpy reference runtime, which can
switch pruning rates at run time. No pickle anywhere: arrays go through safetensors, the rest
through JSON. Deterministic: sorted keys, no timestamps.

Format 2 (written since issue 14) stores the linears in the runtime's pruning-aware layout
(``runtimes.reference.to_runtime_layout``: Q/K/V rows and O columns in (pair slot | component,
head) order, O and ffn_down transposed as ``<name>.weight_t``), so the runtime memory-maps the
file and runs on views of it: a running artifact's weights are file-backed pages, not a private
float32 copy. Format 1 (natural order, ``<name>.weight`` everywhere) still loads; the runtime
then permutes Q/K/V/O/ffn_down into private copies at load, as before.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.frontend.safetensors_io import map_safetensors, read_safetensors
from edgeq.ir import HParams, LayerMeans, Linear, LowRank, ModelIR, PassRecord, PruneSpec, Role, TokenizerSpec
from edgeq.safetensors_writer import save_streaming
from runtimes.reference import from_runtime_layout, layout_moves, to_runtime_layout

WEIGHTS = "model.safetensors"
META = "model.json"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TRANSPOSED = (Role.O, Role.DOWN)  # stored as "<name>.weight_t" in format 2


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


def _weight_key(role: Role, version: int) -> str:
    return "weight_t" if version >= 2 and role in TRANSPOSED else "weight"


def write_ir(ir: ModelIR, out_dir: str | Path) -> list[str]:
    """Write ``ir`` (natural order) into ``out_dir`` in format 2; returns the file names written."""
    out = Path(out_dir)
    hp = ir.hparams
    # name -> (dtype, shape, produce): lazy arrays the runtime layout leaves as they are stay in
    # their file until written (in row chunks); a permuted one is made when written, one at a time
    arrays: dict[str, tuple] = {}

    def add(key, role, kind, a):
        if role is None or not layout_moves(role, kind):
            arrays[key] = (a.dtype, tuple(a.shape), lambda: a)
        else:
            shape = tuple(a.shape)[::-1] if kind == "weight" and role in TRANSPOSED else tuple(a.shape)
            arrays[key] = (a.dtype, shape, lambda: np.ascontiguousarray(
                to_runtime_layout(hp, role, kind, np.asarray(a, dtype=a.dtype))))

    linears = {}
    for name in sorted(ir.linears):
        lin = ir.linears[name]
        add(f"{name}.{_weight_key(lin.role, FORMAT_VERSION)}", lin.role, "weight", lin.weight)
        if lin.bias is not None:
            add(f"{name}.bias", lin.role, "bias", lin.bias)
        branches = []
        for k, lr in enumerate(lin.low_rank):
            add(f"{name}.lr{k}.a", lin.role, "a", lr.a)
            add(f"{name}.lr{k}.b", lin.role, "b", lr.b)
            branches.append({"scale": lr.scale, "source": lr.source})
        linears[name] = {"role": lin.role.value, "layer": lin.layer, "low_rank": branches}
    for name in sorted(ir.tensors):
        add(f"tensor.{name}", None, None, ir.tensors[name])
    for layer in sorted(ir.rope_index):
        add(f"rope_index.{layer}", None, None, np.asarray(ir.rope_index[layer], dtype=np.int64))
    for layer in sorted(ir.prune_means):  # bias compensation: float32 mean inputs, IR column order
        m = ir.prune_means[layer]
        add(f"prune_means.{layer}.down", None, None, np.asarray(m.down, dtype=np.float32))
        add(f"prune_means.{layer}.o", None, None, np.asarray(m.o, dtype=np.float32))
    # streamed: the header from shapes first, then one array (one row chunk of a lazy one) at a time
    save_streaming(out / WEIGHTS, {n: (dt, shape) for n, (dt, shape, _) in arrays.items()},
                   lambda n: arrays[n][2]())
    tok = ir.tokenizer.to_json() if ir.tokenizer is not None else None
    meta = {
        "format_version": FORMAT_VERSION,
        "layout": "pruning-aware",
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
    """The artifact's model in natural order, every array a private float32 copy (format 1 or 2)."""
    d = Path(in_dir)
    meta = _read_meta(d)
    version = meta["format_version"]
    arrays = read_safetensors(d / WEIGHTS)

    def natural(name, role, kind, key=None):
        a = arrays[key or name]
        return np.ascontiguousarray(from_runtime_layout(meta["hparams_obj"], role, kind, a)) if version >= 2 else a

    return _assemble(meta, arrays, natural)


def open_ir(in_dir: str | Path) -> tuple[ModelIR, bool]:
    """(model, laid_out) for the reference runtime: every array a read-only view of one memory map
    of the weights file (nothing read until used). ``laid_out``: the linears are in the runtime's
    layout (format 2; ``ReferenceSession(ir, laid_out=True)`` then copies no weight); for a
    format-1 artifact they are in natural order (the session permutes copies, as before)."""
    d = Path(in_dir)
    meta = _read_meta(d)
    version = meta["format_version"]
    arrays = {k: (v if v.dtype != np.float16 else v.astype(np.float32)) for k, v in map_safetensors(d / WEIGHTS).items()}

    def as_is(name, role, kind, key=None):
        a = arrays[key or name]
        return a.T if version >= 2 and kind == "weight" and role in TRANSPOSED else a

    return _assemble(meta, arrays, as_is), version >= 2


def _read_meta(d: Path) -> dict:
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeqError(f"{d}: no {META}") from None
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"{d / META}: corrupt ({exc.msg})") from None
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise EdgeqError(f"{d / META}: unsupported format version {meta.get('format_version')}")
    meta["hparams_obj"] = HParams.from_json(meta["hparams"])
    return meta


def _assemble(meta: dict, arrays: dict, get) -> ModelIR:
    """The ModelIR of ``meta`` with each linear array from ``get(key, role, kind, stored_key)``."""
    version = meta["format_version"]
    linears = {}
    try:
        for name, info in meta["linears"].items():
            role = Role(info["role"])
            branches = tuple(
                LowRank(a=get(f"{name}.lr{k}.a", role, "a"), b=get(f"{name}.lr{k}.b", role, "b"),
                        scale=float(b["scale"]), source=b["source"]) for k, b in enumerate(info["low_rank"]))
            linears[name] = Linear(name=name, role=role, layer=int(info["layer"]),
                                   weight=get(name, role, "weight", f"{name}.{_weight_key(role, version)}"),
                                   bias=get(f"{name}.bias", role, "bias") if f"{name}.bias" in arrays else None,
                                   low_rank=branches)
    except KeyError as exc:
        raise EdgeqError(f"{META}: the weights file has no array {exc.args[0]!r}") from None
    tensors = {k[len("tensor."):]: v for k, v in arrays.items() if k.startswith("tensor.")}
    rope_index = {int(k.split(".")[1]): v.astype(np.int64) for k, v in arrays.items() if k.startswith("rope_index.")}
    means_layers = sorted({int(k.split(".")[1]) for k in arrays if k.startswith("prune_means.")})
    try:
        prune_means = {li: LayerMeans(down=arrays[f"prune_means.{li}.down"], o=arrays[f"prune_means.{li}.o"])
                       for li in means_layers}
    except KeyError as exc:
        raise EdgeqError(f"{WEIGHTS}: incomplete bias compensation means (no {exc.args[0]!r})") from None
    tok = meta.get("tokenizer")
    tokenizer = TokenizerSpec.from_json(tok) if tok is not None else None
    ir = ModelIR(
        hparams=meta["hparams_obj"],
        linears=linears,
        tensors=tensors,
        tokenizer=tokenizer,
        source=meta.get("source", {}),
        adapters=meta.get("adapters", {}),
        history=tuple(PassRecord(h["name"], h.get("options", {})) for h in meta.get("history", [])),
        rope_index=rope_index,
        prune=PruneSpec.from_json(meta["prune"]) if meta.get("prune") else None,
        prune_means=prune_means,
    )
    ir.validate()
    return ir
