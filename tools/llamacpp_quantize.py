"""llama.cpp's own quantizer and a tensor-by-tensor GGUF comparison, shared by the benchmarks that
set edgeq's GGUFs beside llama.cpp's (tools/bench_gguf.py, tools/bench_gemma3.py; imported by
name: a script's own folder is on sys.path)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

LLAMA_FTYPE = {"Q8_0": 7, "Q4_0": 2}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0


def llamacpp_quantize(src: Path, dst: Path, qtype: str, threads: int,
                      clock: Callable[[], float] = time.perf_counter) -> float:
    """``llama_model_quantize`` ``src`` (an F32 GGUF) to ``qtype`` at ``dst`` (no imatrix); the
    seconds it took by ``clock`` (wall time by default; ``time.process_time`` for CPU time)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[qtype]
    params.nthread = threads
    t = clock()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {qtype} failed ({rc})")
    return clock() - t


def compare_gguf(ours: Path, theirs: Path) -> dict:
    """Tensor-by-tensor comparison (name, type, shape, bytes): counts, and each difference (name,
    our type, their type)."""
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(ours).tensors}
    tb = {t.name: t for t in GGUFReader(theirs).tensors}
    same, diff = 0, []
    for name, t in ta.items():
        u = tb.get(name)
        if u is None:
            diff.append({"tensor": name, "edgeq": t.tensor_type.name, "llama.cpp": None})
        elif t.tensor_type != u.tensor_type or list(t.shape) != list(u.shape):
            diff.append({"tensor": name, "edgeq": t.tensor_type.name, "llama.cpp": u.tensor_type.name})
        elif t.data.tobytes() != u.data.tobytes():
            diff.append({"tensor": name, "edgeq": t.tensor_type.name, "llama.cpp": u.tensor_type.name,
                         "bytes": "differ"})
        else:
            same += 1
    diff += [{"tensor": n, "edgeq": None, "llama.cpp": tb[n].tensor_type.name} for n in tb if n not in ta]
    return {"identical_tensors": same, "tensors": max(len(ta), len(tb)), "differences": diff,
            "file_bytes": [ours.stat().st_size, theirs.stat().st_size]}
