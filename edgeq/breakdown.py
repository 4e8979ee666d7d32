"""Where a decode step's time goes: per layer and per op category, as far as each runtime allows.

* onnxruntime: a second session with ``enable_profiling`` replays decode steps on the same KV
  cache; its JSON trace gives every node's kernel time (subgraph nodes of the pruning-rate ``If``
  branches included); node names carry the layer (``blk.{i}.``) and op types the category.
* TVM: the runtime's kernel calls are timed (Q|K|V, O, gate|up, down per layer, the head); with
  the compiled decoder every library call of the token is timed (attention, add + norm, GLU,
  embedding too) and the rest is Python's loop over the calls; otherwise the rest of the step is
  the numpy decoder (norms, RoPE, attention, SwiGLU), reported as one figure.
* reference runtime: its own per-layer timers (attention block, MLP block).
* llama.cpp: not available — llama-cpp-python exposes no per-op or per-layer timings (only
  whole-call totals), so the report says so instead of inventing a split.

Every result is ``{"available", "runtime", "steps", "per_token_ms", "by_category": {cat: ms},
"by_layer": [{cat: ms}, ...], "unattributed_ms", "method"}`` with times per decode token.
"""
from __future__ import annotations

import json
import re
import tempfile
import time
from collections import defaultdict

from edgeq.profile import prompt_of_length
from edgeq.artifact import artifact_path

CATEGORIES = ("attention", "matmul", "norm", "other")
_LAYER = re.compile(r"blk\.(\d+)\.")


def _result(runtime: str, steps: int, wall: float, per_layer: dict, extra: dict, method: str,
            n_layers: int) -> dict:
    by_layer = [{c: per_layer.get(i, {}).get(c, 0.0) * 1e3 / steps for c in sorted(per_layer.get(i, {}))}
                for i in range(n_layers)]
    by_cat: dict[str, float] = defaultdict(float)
    for row in by_layer:
        for c, v in row.items():
            by_cat[c] += v
    for c, v in extra.items():
        by_cat[c] += v * 1e3 / steps
    attributed = sum(by_cat.values())
    return {"available": True, "runtime": runtime, "steps": steps, "per_token_ms": wall * 1e3 / steps,
            "by_category": dict(by_cat), "by_layer": by_layer,
            "unattributed_ms": max(0.0, wall * 1e3 / steps - attributed), "method": method}


def _start(session) -> None:
    """A fresh 16-token context (run before the instrumentation is put in place)."""
    session._start(prompt_of_length(session, 16))


def _time_steps(session, steps: int) -> float:
    """Seconds for ``steps`` decode steps on the current context."""
    t = time.perf_counter()
    for k in range(steps):
        session._step(100 + k)
    return time.perf_counter() - t


def onnx_breakdown(session, steps: int) -> dict:
    import onnxruntime as ort

    cat = {"MatMulNBits": "matmul", "MatMul": "matmul", "Gemm": "matmul", "GroupQueryAttention": "attention",
           "Softmax": "attention", "RMSNormalization": "norm", "SimplifiedLayerNormalization": "norm"}
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.intra_op_num_threads = session.n_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = f"{tmp}/edgeq"
        prof = ort.InferenceSession(str(artifact_path(session.root, session.manifest["onnx"]["model_file"])), so,
                                    providers=["CPUExecutionProvider"])
        _start(session)
        main, session.sess = session.sess, prof
        try:
            wall = _time_steps(session, steps)
        finally:
            session.sess = main
        events = json.loads(open(prof.end_profiling()).read())
    per_layer: dict = defaultdict(lambda: defaultdict(float))
    extra: dict = defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "")
        c = cat.get(op, "other")
        if op == "If":  # the branch's nodes are traced themselves
            continue
        m = _LAYER.match(e["name"])
        if m:
            per_layer[int(m.group(1))][c] += e["dur"] * 1e-6
        else:
            extra["head + embedding" if c == "matmul" else "other"] += e["dur"] * 1e-6
    return _result("onnxruntime", steps, wall, per_layer, extra,
                   "onnxruntime profiling trace (enable_profiling) of decode steps, kernel times per node; "
                   "tracing slows the run (per_token_ms is the traced time), so read shares, not absolute times",
                   session.hp.num_layers)


def _tvm_compiled_breakdown(session, steps: int) -> dict:
    """Every call of the compiled token timed (runtimes/tvm_decoder.py); the remainder is the
    Python loop around the calls (and the timers)."""
    _start(session)
    dec = session._decoder
    dec.timers = {}
    try:
        wall = _time_steps(session, steps)
        timed = dict(dec.timers)
    finally:
        dec.timers = None
    per_layer: dict = defaultdict(lambda: defaultdict(float))
    extra: dict = defaultdict(float)
    for (li, label), dt in timed.items():
        if li >= 0:
            per_layer[li][label] += dt
        else:
            extra[label] += dt
    res = _result("tvm", steps, wall, per_layer, extra,
                  "timers around each call into the kernel library (kernels and the compiled decoder); the "
                  "remainder is the Python loop over the calls", session.hp.num_layers)
    res["by_category"]["python loop"] = res.pop("unattributed_ms")
    res["unattributed_ms"] = 0.0
    return res


def tvm_breakdown(session, steps: int) -> dict:
    if getattr(session, "compiled_decoder", False):
        return _tvm_compiled_breakdown(session, steps)
    per_layer: dict = defaultdict(lambda: defaultdict(float))
    extra: dict = defaultdict(float)
    orig = session._matmul

    def timed(name, x, n):
        t = time.perf_counter()
        y = orig(name, x, n)
        dt = time.perf_counter() - t
        m = _LAYER.match(name)
        if m:
            per_layer[int(m.group(1))]["kernel " + name.split(".")[-1]] += dt
        else:
            extra["kernel head"] += dt
        return y

    _start(session)
    session._matmul = timed
    try:
        wall = _time_steps(session, steps)
    finally:
        del session._matmul  # back to the class method
    res = _result("tvm", steps, wall, per_layer, extra,
                  "timers around each generated-kernel call; the remainder is the numpy decoder", session.hp.num_layers)
    res["by_category"]["numpy decoder"] = res.pop("unattributed_ms")
    res["unattributed_ms"] = 0.0
    return res


def reference_breakdown(session, steps: int) -> dict:
    _start(session)
    session.timers = defaultdict(lambda: defaultdict(float))
    try:
        wall = _time_steps(session, steps)
        per_layer = {i: dict(v) for i, v in session.timers.items()}
    finally:
        session.timers = None
    return _result("reference", steps, wall, per_layer, {}, "the reference runtime's per-layer timers",
                   session.hp.num_layers)


# backend name -> how its runtime's decode step is broken down; the others say why not
# (``Backend.no_breakdown``, e.g. llama.cpp exposes only whole-call totals)
_BY_BACKEND = {"onnx": onnx_breakdown, "tvm": tvm_breakdown, "reference": reference_breakdown}


def breakdown(session, steps: int = 16) -> dict:
    """The breakdown of the backend whose runtime ``session`` is (edgeq.backends registry)."""
    from edgeq.backends import Backend, for_runtime

    backend = for_runtime(getattr(session, "name", "")) or Backend()
    fn = _BY_BACKEND.get(backend.name)
    return fn(session, steps) if fn is not None else backend.breakdown(session, steps)
