"""`edgeq inspect`: manifest, tensors and sizes of an artifact."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from edgeq.artifact import artifact_path, read_manifest
from edgeq.errors import EdgeqError, require


def gguf_tensors(path: Path) -> list[dict]:
    from edgeq.backends.gguf.extents import check_metadata_extents

    gguf = require("gguf", "gguf")
    check_metadata_extents(Path(path))  # before gguf-py, which loops over oversized arrays
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises assorted errors on corrupt files
        raise EdgeqError(f"{path}: corrupt GGUF ({exc.__class__.__name__}: {exc})") from None
    return [{"name": t.name, "type": t.tensor_type.name, "shape": [int(x) for x in reversed(t.shape)],
             "bytes": int(t.n_bytes)} for t in reader.tensors]


def describe(artifact_dir: str | Path) -> dict:
    root = Path(artifact_dir)
    m = read_manifest(root)
    files = {}
    for name, info in m["files"].items():
        entry = dict(info)
        if name.endswith(".gguf"):
            entry["tensors"] = gguf_tensors(artifact_path(root, name))
        files[name] = entry
    return {"manifest": m, "files": files}


def _weights_line(m: dict) -> str:
    if m.get("plan_file"):
        types = Counter(v for k, v in m.get("tensor_types", {}).items() if "norm" not in k and not k.endswith(".bias"))
        ranks = m.get("ranks", {})
        size = m.get("size", {})
        mix = ", ".join(f"{n}x{t}" for t, n in sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))
        comp = f"; compensation on {len(ranks)} linears (ranks {sorted(set(ranks.values()))})" if ranks else ""
        bpw = f"; {size['bpw']:.3f} bpw" if "bpw" in size else ""
        pred = (f"; size predicted {size['predicted_total_bytes'] / 1e6:.2f} MB, realised "
                f"{size['realised_total_bytes'] / 1e6:.2f} MB") if "predicted_total_bytes" in size else ""
        return f"weights       mixed plan ({m['plan_file']}): {mix}{comp}{bpw}{pred}"
    return f"weights       {m.get('weight_type')} ({m.get('bits')}-bit plan)"


def format_description(d: dict, show_tensors: bool = False) -> str:
    m = d["manifest"]
    hp = m.get("hparams", {})
    lines = [
        f"format        {m['format']}  (schema {m['schema_version']}, edgeq {m['edgeq_version']})",
        f"target        {m['target']}",
        _weights_line(m),
        f"model         {hp.get('arch')}: {hp.get('num_layers')} layers, hidden {hp.get('hidden_size')}, "
        f"ffn {hp.get('intermediate_size')}, heads {hp.get('num_heads')}/{hp.get('num_kv_heads')}, "
        f"vocab {hp.get('vocab_size')}",
        f"source        {m.get('source', {}).get('path')}",
    ]
    for name, a in m.get("adapters", {}).items():
        lines.append(f"adapter       {name}: rank {a.get('rank')}, {a.get('linears')} linears, "
                     f"mode {m['options'].get('adapter_mode')}, sha256 {str(a.get('sha256'))[:12]}")
    p = m.get("prune")
    if p:
        lines.append(f"pruning       rates {', '.join(f'{float(r):g}' for r in p['rates'])} ({p.get('method')} sort, "
                     f"granularity {p.get('granularity')}): {p.get('expressed', '')}")
    lines.append("files:")
    for name, f in sorted(d["files"].items()):
        extra = ""
        if "tensors" in f:
            c = Counter(t["type"] for t in f["tensors"])
            extra = "  " + ", ".join(f"{n}x{t}" for t, n in sorted(c.items()))
        lines.append(f"  {name:<28} {f['bytes'] / 1e6:9.2f} MB  {f['sha256'][:12]}{extra}")
        if show_tensors and "tensors" in f:
            for t in f["tensors"]:
                lines.append(f"    {t['name']:<36} {t['type']:<6} {str(t['shape']):<16} {t['bytes']:>12,d} B")
    return "\n".join(lines)
