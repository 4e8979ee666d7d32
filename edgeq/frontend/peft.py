"""PEFT LoRA adapters -> LowRank branches on a ModelIR; merging them into the weights."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.families import Family, family
from edgeq.frontend.jsonfile import read_json
from edgeq.frontend.safetensors_io import read_safetensors
from edgeq.hashing import sha256_file
from edgeq.ir import Linear, LowRank, ModelIR, PassRecord, linear_name

# PEFT names an adapted linear's tensors base_model.model.<HF module path>.lora_A[.<adapter>].weight
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module_path>.+)\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight$")


def _read_config(adapter_dir: Path) -> dict:
    return read_json(adapter_dir / "adapter_config.json",
                     missing=f"{adapter_dir}: no adapter_config.json (expected a PEFT adapter directory)")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_types(cfg, where: Path) -> None:
    """The fields edgeq reads, with the JSON types PEFT writes (else one EdgeqError line)."""
    if not isinstance(cfg, dict):
        raise EdgeqError(f"{where}: adapter_config.json is not a JSON object")
    kinds = {"peft_type": (str,), "bias": (str,), "base_model_name_or_path": (str,), "base_model_class": (str,),
             "auto_mapping": (dict,), "alpha_pattern": (dict,), "rank_pattern": (dict,),
             "target_modules": (list, str), "modules_to_save": (list,)}
    for key, types in kinds.items():
        if cfg.get(key) is not None and not isinstance(cfg[key], types):
            raise EdgeqError(f"{where}: adapter_config.json {key} is a {type(cfg[key]).__name__}, expected "
                             f"{' or '.join('object' if t is dict else t.__name__ for t in types)}")
    if isinstance(cfg.get("target_modules"), list) and not all(isinstance(t, str) for t in cfg["target_modules"]):
        raise EdgeqError(f"{where}: adapter_config.json target_modules must be module names")
    if cfg.get("r") is not None and not (isinstance(cfg["r"], int) and not isinstance(cfg["r"], bool)):
        raise EdgeqError(f"{where}: adapter_config.json r must be an integer, got {cfg['r']!r}")
    if "lora_alpha" in cfg and not _number(cfg["lora_alpha"]):
        raise EdgeqError(f"{where}: adapter_config.json lora_alpha must be a finite number, got {cfg['lora_alpha']!r}")
    patterns = list((cfg.get("alpha_pattern") or {}).items())
    if isinstance(cfg.get("target_modules"), str):
        patterns.append((cfg["target_modules"], 1))
    for pat, a in patterns:
        if not _number(a):
            raise EdgeqError(f"{where}: adapter_config.json alpha_pattern {pat!r}: not a finite number")
        try:
            re.compile(pat)
        except re.error as exc:
            raise EdgeqError(f"{where}: adapter_config.json: invalid pattern {pat!r} ({exc})") from None


def _check_config(cfg: dict, where: Path, fam: Family) -> None:
    _check_types(cfg, where)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise EdgeqError(f"{where}: adapter type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise EdgeqError(f"{where}: DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise EdgeqError(f"{where}: LoRA adapters that train biases (bias={cfg['bias']!r}) are not supported")
    if cfg.get("modules_to_save"):
        raise EdgeqError(f"{where}: modules_to_save {cfg['modules_to_save']} is not supported")
    if cfg.get("fan_in_fan_out"):
        raise EdgeqError(f"{where}: fan_in_fan_out adapters are not supported for {fam.arch.value}")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        return  # a regex; checked per tensor below
    unknown = [t for t in targets if t not in fam.peft_modules]
    if unknown:
        raise EdgeqError(f"{where}: adapter targets module {unknown[0]!r}, which this model has no "
                         f"LoRA-able linear for (supported: {', '.join(fam.peft_modules)})")


_CLASS_FAMILY_RE = re.compile(r"^([A-Za-z0-9]+?)(?:For[A-Za-z]+|PreTrainedModel|Model)$")
_PARENT_LIBRARY_RE = re.compile(r"^transformers\.models\.(\w+)\.modeling_\w+$")


def _recorded_base_class(cfg: dict) -> tuple[str, str] | None:
    """(class name, where it is recorded) of the model the adapter was trained on, if recorded:
    PEFT writes ``auto_mapping: {base_model_class, parent_library}``; older configs a top-level
    ``base_model_class``."""
    am = cfg.get("auto_mapping")
    if isinstance(am, dict) and am.get("base_model_class"):
        return str(am["base_model_class"]), "auto_mapping.base_model_class"
    if cfg.get("base_model_class"):
        return str(cfg["base_model_class"]), "base_model_class"
    return None


def _check_class(cls: str, where: str, ir: ModelIR, name: str) -> None:
    ours = family(ir.arch).hf_architectures
    if cls in ours:
        return
    fam = _CLASS_FAMILY_RE.match(cls)
    if fam is None or fam.group(1).lower() != ir.arch.value:
        raise EdgeqError(f"adapter {name!r} does not match the model: it was trained on a {cls} "
                         f"(adapter_config.json {where}), this model is a {ir.arch.value} ({ours[0]})")


def _check_base(cfg: dict, ir: ModelIR, name: str) -> None:
    """The base model the adapter records must be this model's architecture: the base class PEFT
    recorded (``auto_mapping``), the library it came from, and, when ``base_model_name_or_path``
    is a local checkpoint, its config (model type, architectures, shapes). A hub id that is not
    on this machine cannot be checked beyond the class; its name is kept in the manifest."""
    rec = _recorded_base_class(cfg)
    if rec is not None:
        _check_class(*rec, ir, name)
    am = cfg.get("auto_mapping")
    lib = am.get("parent_library") if isinstance(am, dict) else None
    m = _PARENT_LIBRARY_RE.match(str(lib or ""))
    if m and m.group(1) != ir.arch.value:
        raise EdgeqError(f"adapter {name!r} does not match the model: it was trained on a {m.group(1)} model "
                         f"(adapter_config.json auto_mapping.parent_library {lib}), this model is {ir.arch.value}")
    base = cfg.get("base_model_name_or_path")
    if not base or not isinstance(base, str):
        return
    base_cfg = Path(base) / "config.json"
    try:
        if not base_cfg.is_file():
            return
        bc = json.loads(base_cfg.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(bc, dict):
        return
    if bc.get("model_type") and bc.get("model_type") != family(ir.arch).hf_model_type:
        raise EdgeqError(f"adapter {name!r} does not match the model: it was trained on a "
                         f"{bc.get('model_type')} model ({base}), this model is {ir.arch.value}")
    for cls in bc.get("architectures") or []:
        _check_class(str(cls), f"base_model_name_or_path {base}: architectures", ir, name)
    hp = ir.hparams
    for key, ours in (("hidden_size", hp.hidden_size), ("num_hidden_layers", hp.num_layers),
                      ("intermediate_size", hp.intermediate_size), ("num_attention_heads", hp.num_heads),
                      ("num_key_value_heads", hp.num_kv_heads)):
        try:
            theirs = int(bc[key]) if bc.get(key) is not None else None
        except (TypeError, ValueError):
            theirs = None
        if theirs is not None and theirs != ours:
            raise EdgeqError(f"adapter {name!r} does not match the model: its base has {key}={bc[key]}, "
                             f"this model has {ours}")


def _scale(cfg: dict, module: str, rank: int) -> float:
    alpha = cfg.get("lora_alpha", 8)
    for pat, a in (cfg.get("alpha_pattern") or {}).items():
        if re.search(pat, module):
            alpha = a
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def load_adapter(ir: ModelIR, adapter_dir: str | Path, name: str | None = None) -> ModelIR:
    """Attach a PEFT LoRA adapter as low-rank branches; refuse any mismatch with the model."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise EdgeqError(f"{adapter_dir}: adapter directory not found")
    name = name or adapter_dir.name
    if name in ir.adapters:
        raise EdgeqError(f"adapter name {name!r} used twice")
    cfg = _read_config(adapter_dir)
    fam = family(ir.arch)
    _check_config(cfg, adapter_dir, fam)
    _check_base(cfg, ir, name)
    rec = _recorded_base_class(cfg)
    wfile = adapter_dir / "adapter_model.safetensors"
    if not wfile.exists():
        if (adapter_dir / "adapter_model.bin").exists():
            raise EdgeqError(f"{adapter_dir}: adapter_model.bin is a pickle; edgeq loads safetensors only")
        raise EdgeqError(f"{adapter_dir}: no adapter_model.safetensors")
    raw = read_safetensors(wfile)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key in sorted(raw):
        m = _KEY_RE.match(key)
        if not m:
            raise EdgeqError(f"{adapter_dir}: tensor {key!r} does not belong to a "
                             f"{ir.arch.value} model (expected base_model.model.model.layers.N.<module>.lora_A/B)")
        module = m["module_path"].rsplit(".", 1)[-1]
        ir_name = fam.ir_name_of_hf(f"{m['module_path']}.weight")
        role = fam.peft_modules.get(module)
        if ir_name is None or role is None or ir_name.split(".")[2:] != [role.value]:
            raise EdgeqError(f"{adapter_dir}: tensor {key!r} targets module {module!r}, unknown to {ir.arch.value}")
        layer_s = ir_name.split(".")[1]
        ab = m["ab"]
        pairs.setdefault(linear_name(int(layer_s), role), {})[ab] = raw[key]
        pairs[linear_name(int(layer_s), role)]["module"] = module  # type: ignore[assignment]
    if not pairs:
        raise EdgeqError(f"{adapter_dir}: adapter has no LoRA tensors")
    linears = dict(ir.linears)

    def order(n: str) -> tuple[int, str]:
        return int(n.split(".")[1]), n

    for lname in sorted(pairs, key=order):
        p = pairs[lname]
        if "A" not in p or "B" not in p:
            raise EdgeqError(f"{adapter_dir}: {lname}: lora_{'B' if 'A' in p else 'A'} missing")
        lin = linears.get(lname)
        if lin is None:
            raise EdgeqError(f"adapter {name!r} does not match the model: it adapts {lname}, "
                             f"but the model has only {ir.hparams.num_layers} layers")
        a, b = p["A"].astype(np.float32), p["B"].astype(np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise EdgeqError(f"adapter {name!r}: {lname}: lora_A {a.shape} and lora_B {b.shape} are inconsistent")
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
            raise EdgeqError(
                f"adapter {name!r} does not match the model (another base model?): {lname} expects "
                f"in={lin.in_features} out={lin.out_features}, adapter has in={a.shape[1]} out={b.shape[0]}")
        lr = LowRank(a=a, b=b, scale=_scale(cfg, str(p["module"]), a.shape[0]), source=f"lora:{name}")
        linears[lname] = dataclasses.replace(lin, low_rank=lin.low_rank + (lr,))
    info = {
        "path": str(adapter_dir),
        "sha256": sha256_file(wfile),
        "config_sha256": sha256_file(adapter_dir / "adapter_config.json"),
        "rank": int(cfg.get("r") or 0),
        "alpha": cfg.get("lora_alpha"),
        "target_modules": sorted({str(p["module"]) for p in pairs.values()}),
        "base_model": cfg.get("base_model_name_or_path"),
        "base_model_class": rec[0] if rec else None,
        "linears": len(pairs),
    }
    adapters = dict(ir.adapters)
    adapters[name] = info
    return ir.replace(linears=linears, adapters=adapters,
                      history=ir.history + (PassRecord("load_adapter", {"name": name}),))


def merge_adapters(ir: ModelIR, names: list[str] | None = None) -> ModelIR:
    """W <- W + scale * B @ A for the LoRA branches of the named adapters (default: all)."""
    sources = {f"lora:{n}" for n in (names if names is not None else ir.adapters)}
    linears: dict[str, Linear] = {}
    for lname, lin in ir.linears.items():
        keep, merge = [], []
        for lr in lin.low_rank:
            (merge if lr.source in sources else keep).append(lr)
        if merge:
            w = lin.weight.copy()
            for lr in merge:
                w += (lr.b @ lr.a) * np.float32(lr.scale)
            lin = dataclasses.replace(lin, weight=w, low_rank=tuple(keep))
        linears[lname] = lin
    return ir.replace(linears=linears,
                      history=ir.history + (PassRecord("merge_adapters", {"names": sorted(s[5:] for s in sources)}),))
