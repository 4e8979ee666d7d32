"""Memory budget: what each build step needs, checked before the build starts.

Running out of memory is an error, not a kill: :func:`check_build` estimates the peak of every
step a build will run (from the model's shapes and the options), compares it with what this
process may use — the smaller of ``MemAvailable`` and the room its memory cgroups leave it
(:mod:`edgeq.cgroups`: v1 and v2, every level), or
``$EDGEQ_MEMORY_LIMIT`` (e.g. ``4G``) when set — and refuses with one line naming the step, what it
needs, what is available and which option lowers it.

The estimates follow the code: streamed steps (GGUF writing, goldens, calibration, the UniQL
sorts) hold one layer (calibration: plus a set of float64 sums per shard in flight, whose number
:func:`calib_workers` lowers where memory is short); the steps that still hold the whole model
(the planner's KL probe and the recovery fine-tune run a torch forward of every layer) are
counted at the model's size; the planner leaves its probe out where it does not fit. They are
upper-side estimates (measured peaks are in docs/benchmarks.md); memory-mapped weight files are
not counted (the kernel can drop those pages).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from edgeq.cgroups import memory_room
from edgeq.errors import EdgeqError
from edgeq.ir import HParams, linear_shapes, n_weight_params

BASE_BYTES = 600 << 20  # the interpreter, numpy, tokenizers, llama.cpp / onnxruntime / tvm libraries
GB = 1e9


@dataclass(frozen=True)
class Step:
    name: str
    bytes: int
    hint: str


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
    if not m:
        raise EdgeqError(f"EDGEQ_MEMORY_LIMIT: expected a size such as 4G or 512M, got {text!r}")
    return int(float(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()])


def available_bytes() -> int:
    env = os.environ.get("EDGEQ_MEMORY_LIMIT")
    if env:
        return parse_size(env)
    import psutil

    avail = int(psutil.virtual_memory().available)
    room = memory_room()
    return min(avail, room) if room is not None else avail


def _layer_params(hp: HParams) -> int:
    return sum(a * b for a, b in linear_shapes(hp).values())


model_params = n_weight_params  # parameters in the 2-D weights


def sort_layer_bytes(hp: HParams) -> int:
    """One layer's UniQL sort work: the MLP score's ffn x ffn float64 copies (the factorisation of a
    wide one in place, an eigendecomposition's vectors for a narrow one)."""
    from edgeq.passes.sort_mlp import EIGH_MAX

    f = hp.intermediate_size
    return (3 if f > EIGH_MAX else 5) * 8 * f * f


def _threads_within_half(need, threads: int | None, avail: int | None) -> int:
    """The build's threads (``threads``, else ``EDGEQ_THREADS`` or the CPU count, at most 4), fewer
    while ``need(w)`` bytes for ``w`` threads would pass half of ``avail`` (default: available)."""
    threads = threads if threads is not None else (int(os.environ.get("EDGEQ_THREADS", "0")) or os.cpu_count() or 1)
    avail = available_bytes() if avail is None else avail
    w = max(1, min(4, int(threads)))
    while w > 1 and need(w) > avail // 2:
        w -= 1
    return w


def sort_workers(hp: HParams, threads: int | None = None, avail: int | None = None) -> int:
    """Layers the UniQL sorts work on at once (one thread each, edgeq.streaming.layer_workers):
    the build's threads (``EDGEQ_THREADS`` or the CPU count, at most 4), fewer where that many
    layers' sort work would pass half the memory available; the bytes do not depend on it."""
    return _threads_within_half(lambda w: BASE_BYTES + w * sort_layer_bytes(hp), threads, avail)


def calibration_bytes(hp: HParams, calib_samples: int, calib_len: int, workers: int = 1) -> int:
    """Peak of calibration (edgeq.calibrate), BASE_BYTES not included, with ``workers`` shards in
    flight: one layer's float32 weights; the float64 sums (``acc``: the four Gram matrices) — the
    layer's running sum (the first shard's sums) plus a partial sum per shard in flight:
    ``workers + 1`` sets once that many shards exist (and at least the running sum and the
    C-order copy of the MLP one that the layer's result makes); the residual streams of every
    sample, the outputs of the shards in flight (float32) and each worker's forward temporaries
    (one sequence's activations and attention scores); 10 % on top for the allocator and the
    result's temporaries (the triangle mirroring's blocks). tests/test_memory.py checks it against
    a measured peak."""
    from edgeq.calibrate import shard_bounds

    h, f, H, D = hp.hidden_size, hp.intermediate_size, hp.num_heads, hp.head_dim
    n, T = max(1, int(calib_samples)), int(calib_len)
    shards = shard_bounds(n)
    per_shard = shards[0][1] - shards[0][0]
    w = max(1, min(int(workers), len(shards)))
    layer = 4 * _layer_params(hp)
    acc = 8 * (f * f + 2 * h * h + (H * D) ** 2)
    sums = max(min(w + 1, len(shards)) * acc, acc + 8 * f * f)
    acts = 4 * (n * T * h + (w + 1) * per_shard * T * h + w * (T * (3 * f + 6 * h + 2 * H * D) + 2 * H * T * T))
    return int(1.1 * (layer + sums + acts))


def calib_workers(hp: HParams, calib_samples: int, calib_len: int, want: int, avail: int | None = None) -> int:
    """Calibration shards to run at a time: ``want`` (threads or executor workers), at most the
    number of shards, and fewer where their sums would not fit in ``avail`` (default: what this
    process may use); at least 1. The statistics do not depend on it (edgeq.calibrate)."""
    from edgeq.calibrate import shard_bounds

    w = max(1, min(int(want), len(shard_bounds(max(1, int(calib_samples))))))
    avail = available_bytes() if avail is None else int(avail)
    while w > 1 and BASE_BYTES + calibration_bytes(hp, calib_samples, calib_len, w) > avail:
        w -= 1
    return w


def build_steps(hp: HParams, *, fmt: str, prunes: bool, planned: bool, recover: bool, goldens: bool,
                calib_samples: int, calib_len: int, probe_samples: int = 4, measured: bool = False,
                calib_workers: int = 1) -> list[Step]:
    """The steps a build runs, each with its estimated peak (bytes, BASE_BYTES included);
    ``calib_workers``: calibration shards in flight (:func:`calib_workers`)."""
    h, f, H, KV, D = hp.hidden_size, hp.intermediate_size, hp.num_heads, hp.num_kv_heads, hp.head_dim
    layer = 4 * _layer_params(hp)  # one layer's weights in float32
    largest = 4 * max(f * h, H * D * h)  # largest block linear in float32
    n_params = model_params(hp)
    steps: list[Step] = []
    if prunes or planned:
        steps.append(Step("calibration", BASE_BYTES + calibration_bytes(hp, calib_samples, calib_len, calib_workers),
                          "lower --calib-samples / --calib-len"))
    if prunes:
        from edgeq.passes.sort_mlp import EIGH_MAX

        steps.append(Step("UniQL sorting", BASE_BYTES + sort_workers(hp) * sort_layer_bytes(hp) + 3 * 2 * largest,
                          "the MLP sort's eigendecomposition is ffn x ffn float64 per layer"))
        if measured:  # the measured allocation's probe: the planner's KL probe (+ one layer's float64 curve work)
            N = probe_samples * calib_len  # probe tokens: the model in float32, every layer's input, the
            # reference log-probs and probabilities, a tail's logits (float32) and log-probs / KL terms (float64),
            # one layer's curve work (ffn_down's input and output sums in float64), one layer's torch forward
            # temporaries (gate, up, their product, q/k/v/o and RoPE; attention scores and softmax)
            need = (4 * n_params + 4 * hp.num_layers * N * h + (4 + 4 * 8) * N * hp.vocab_size
                    + 8 * N * (f + 2 * h) + 4 * N * (6 * f + 12 * h) + 3 * 4 * N * H * calib_len)
            # + 25 %: torch's allocator and short-lived copies the sum leaves out (a 4-layer test model's
            # step peaked 0.7 % above the sum in one CI run, below it in others: the sum alone is no bound)
            need = need * 5 // 4
            steps.append(Step("measured pruning allocation", BASE_BYTES + need,
                              "use --importance angular or uniform (the measured allocation's KL probe holds the "
                              "whole model in float32)"))
        if recover:
            from edgeq.passes.recover import RecoverConfig

            rc = RecoverConfig()  # a step's logits: the student's, their gradient and log-softmax, the
            logits = 5 * 4 * rc.batch_size * rc.seq_len * hp.vocab_size  # KL teacher's log-probs (float32)
            steps.append(Step("recovery fine-tune", BASE_BYTES + 3 * 4 * n_params + logits,
                              "drop --recover (the fine-tune holds the whole model in float32)"))
    if planned:  # the KL probe is used only where it fits (edgeq.pipeline PlanStep); else layer output errors
        steps.append(Step("planning (per-tensor measurements)", BASE_BYTES + planner_measure_bytes(hp, planner_workers(hp)),
                          "give --bits or --qtype instead of a planned build"))
        steps.append(Step("GPTQ quantization", BASE_BYTES + 6 * largest + 3 * 8 * f * f,
                          "give --bits or --qtype instead of a planned build"))
    # every writer streams (row chunks): GGUF 16M-value chunks through ggml's quantizer; ONNX / TVM /
    # reference 4M-value chunks through the int-group quantizer (~60 bytes per value), a float32
    # ONNX linear transposed whole, TVM's kernel compile (LLVM) on top
    lower = {"gguf": 8 * 4 * (1 << 24) + 3 * largest,
             "tvm": 60 * (1 << 22) + 3 * largest + (500 << 20)}.get(fmt, 60 * (1 << 22) + 3 * largest)
    steps.append(Step(f"{fmt} lowering", BASE_BYTES + lower, "nothing lowers this but a machine with more memory"))
    if goldens:
        steps.append(Step("recording goldens", BASE_BYTES + goldens_bytes(hp, fmt),
                          "the reference runs layer by layer; --no-goldens skips them (verify then has "
                          "nothing to compare with)"))
    return steps


def goldens_bytes(hp: HParams, fmt: str | None) -> int:
    """Peak of recording goldens, BASE_BYTES not included: the larger of its two halves, which run
    one after the other — the reference (runtimes.reference.streamed_logits: one layer's weights in
    its store dtype, the largest linear's float32 temporaries (its rounding for the floor), a
    chunk of the head in the arithmetic dtype, 256 positions' logits) and the artifact in its
    runtime (the backend's ``goldens_run_bytes``: buffers, plus any copy of the weights it makes)."""
    from edgeq.backends import registry
    from edgeq.backends.base import run_buffers_bytes
    from runtimes.reference import HEAD_CHUNK_ROWS, streamed_dtypes

    layer = _layer_params(hp)
    largest = max(a * b for a, b in linear_shapes(hp).values())
    dtype, store = streamed_dtypes(layer)
    ref = (layer * store.itemsize + 2 * 4 * largest + 2 * HEAD_CHUNK_ROWS * hp.hidden_size * dtype.itemsize
           + 256 * hp.vocab_size * 12)
    backend = registry.find(fmt)
    return max(ref, backend.goldens_run_bytes(hp) if backend is not None else run_buffers_bytes(hp))


def planner_tensor_bytes(hp: HParams) -> int:
    """One thread's share of the planner's measurement (below), allocator margin included: the
    largest linear's weight, codes, dequantized values, error and whitened error, the dense rank
    path's float64 copies or a vocabulary table's rows, a float64 sum-of-squares chunk."""
    from edgeq.quant.errcurve import DENSE_MAX

    h = hp.hidden_size
    shapes = linear_shapes(hp).values()
    P = max(a * b for a, b in shapes)
    dense = max((8 * a * b + 8 * min(a, b) ** 2 for a, b in shapes if min(a, b) <= DENSE_MAX), default=0)
    tables = 13 * 1024 * h
    chunk = 8 * min(P, 1 << 22)  # edgeq.quant.errcurve._sum_sq
    return int(1.1 * (18 * P + chunk + max(dense, tables)))


def planner_measure_bytes(hp: HParams, workers: int = 1) -> int:
    """Peak of the planner's per-tensor measurements (edgeq.plan.measure_options with
    edgeq.quant.errcurve), BASE_BYTES not included: a layer's float32 Cholesky factors (attention,
    o_proj, MLP and down_proj inputs, kept while the layer is measured), the float64 copy the
    largest one is factored in, and per thread (``workers`` linears measured at once) the largest
    linear's work (:func:`planner_tensor_bytes`: ~18 bytes per value, a float64 copy and Gram
    matrix where its smaller side takes the exact (dense) rank path, a float64 chunk of a sum of
    squares); 10 % on top for the allocator and the fits' temporaries. The vocabulary tables are
    measured 1024 rows at a time (~13 bytes per value: small). tests/test_memory.py checks it
    against a measured peak."""
    h, f, HD = hp.hidden_size, hp.intermediate_size, hp.num_heads * hp.head_dim
    n_max = max(h, f, HD)
    factors = 4 * (2 * h * h + HD * HD + f * f)
    return int(1.1 * (factors + 8 * n_max * n_max)) + max(1, int(workers)) * planner_tensor_bytes(hp)


def planner_workers(hp: HParams, threads: int | None = None, avail: int | None = None) -> int:
    """Linears of a layer the planner measures at once (one thread each,
    edgeq.streaming.layer_workers): the build's threads (``EDGEQ_THREADS`` or the CPU count, at
    most 4), fewer where the step would pass half the memory available; the plan does not depend
    on it."""
    return _threads_within_half(lambda w: BASE_BYTES + planner_measure_bytes(hp, w), threads, avail)


# The planner's whole-model KL probe (a torch forward of every layer) is used only up to this size
# (SmolLM2-135M: ~1.3 GB); larger models are planned from layer-local output errors, so that no
# step holds the whole model in float32.
PROBE_MAX_BYTES = 2_000_000_000


def probe_bytes(hp: HParams, probe_samples: int = 4, sensitivity: str = "kl-probe") -> int:
    """Peak of the planner's KL sensitivity probe: a torch forward of the whole model in float32,
    every layer's input cached, reference log-probs in float64; with ``sensitivity="fisher"``
    also every linear's perturbation (float32, the size of the model) and the autograd graph of
    one forward (each layer's saved activations) for the backward passes."""
    h, f = hp.hidden_size, hp.intermediate_size
    N = probe_samples * 128
    need = (BASE_BYTES + 4 * model_params(hp) + 4 * hp.num_layers * N * h + 3 * 8 * N * hp.vocab_size)
    if sensitivity == "fisher":
        HD = hp.num_heads * hp.head_dim
        need += 4 * model_params(hp) + 4 * hp.num_layers * N * (12 * h + 6 * f + 2 * HD) + 3 * 4 * N * hp.vocab_size
    return need


def spill_bytes(hp: HParams, *, prunes: bool, planned: bool) -> int:
    """Disk the spill directory (edgeq.spill) may take: the calibration statistics (float64) and
    what the passes rewrite — the sorted weights (float32) or GPTQ's dequantized weights + codes."""
    h, f, HD = hp.hidden_size, hp.intermediate_size, hp.num_heads * hp.head_dim
    stats = hp.num_layers * 8 * (f * f + 2 * h * h + HD * HD) if (prunes or planned) else 0
    weights = hp.num_layers * _layer_params(hp) * ((4 if prunes else 0) + (5 if planned else 0))
    return stats + weights


def check_build(hp: HParams, log=None, spill_dir: str | os.PathLike | None = None, **kw) -> list[Step]:
    """Refuse (EdgeqError) before the build when a step would not fit in memory, or when the spill
    directory (``spill_dir``'s file system) lacks the disk it may need; returns the steps."""
    steps = build_steps(hp, **kw)
    if spill_dir is not None:
        import shutil

        need = spill_bytes(hp, prunes=kw.get("prunes", False), planned=kw.get("planned", False))
        free = shutil.disk_usage(spill_dir).free
        if need > free:
            raise EdgeqError(f"the build parks up to {need / GB:.1f} GB of statistics and rewritten weights on disk "
                             f"next to the output and {spill_dir} has {free / GB:.1f} GB free; free disk space or "
                             "write the output (-o) to a larger file system")
    avail = available_bytes()
    for s in steps:
        if s.bytes > avail:
            raise EdgeqError(f"{s.name} needs about {s.bytes / GB:.1f} GB of memory and {avail / GB:.1f} GB is "
                             f"available (estimated for {model_params(hp) / 1e9:.2f} B parameters); {s.hint}")
    if log is not None:
        peak = max(steps, key=lambda s: s.bytes)
        log(f"memory: peak step {peak.name} ~{peak.bytes / GB:.1f} GB of {avail / GB:.1f} GB available")
    return steps
