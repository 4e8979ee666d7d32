"""GPTQ of one layer's linears as one task per linear (edgeq.pipeline.split), timed: sequential in
this process, or over Ray with its workers; the work and data of every task written down.

    python -m models.scale --shape llama-3.2-1b --layers 1 --tokenizer tiny --out CKPT
    OMP_NUM_THREADS=1 python tools/bench_split.py --model CKPT --mode sequential
    python tools/bench_split.py --model CKPT --mode ray --workers 1         # a new local Ray, 1 CPU
    python tools/bench_split.py --model CKPT --mode ray --ray-address 127.0.0.1:PORT   # a cluster

The tasks are exactly those :func:`edgeq.quant.apply.quantize_ir` hands an executor for one layer:
``(LinearJob, weight, input covariance)``, the covariance shared by the linears that read the same
input (q/k/v, gate/up: shipped once). The covariances are synthetic (``X^T X / n`` of ``--tokens``
Gaussian rows, float64, fixed seed): GPTQ's work does not depend on their values, only on the
shapes, and this keeps calibration of a 128k-vocabulary model out of the measurement. Every run
prints a digest of all the results (dequantized weights, GGML bytes, compensation factors): equal
digests = byte-identical results across modes.

Per task: bytes in (weight float32 + covariance float64, the covariance counted once per layer in
"shipped"), bytes out (dequantized float32 + packed + factors), an estimate of the GPTQ FLOPs
(``R K^2`` for the lazy-batch updates + ``R K b`` inside the batches + ``2/3 K^3`` for the
inverse Hessian's Cholesky factor (potrf + trtri); the per-column encode is O(R K) but interpreted Python), and the
CPU seconds the task took where it ran (``time.process_time`` inside the task).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gptq_flops(R: int, K: int, batch: int = 128) -> float:
    return R * K * K + R * K * batch + 2 / 3 * K ** 3


def layer_tasks(model: Path, layer: int, qtype: str, rank: int, tokens: int, seed: int = 0):
    from edgeq.frontend import load_model
    from edgeq.quant.linear_task import LinearJob

    ir = load_model(model)
    lins = [lin for lin in ir.linears.values() if lin.layer == layer]
    if not lins:
        raise SystemExit(f"error: {model} has no layer {layer}")
    rng = np.random.default_rng(seed)
    covs: dict[str, np.ndarray] = {}
    share = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "ffn_gate": "ffn_in", "ffn_up": "ffn_in"}
    tasks = []
    for lin in lins:
        role = lin.name.split(".")[-1]
        key = share.get(role, role)
        K = int(lin.weight.shape[1])
        if key not in covs:
            x = rng.standard_normal((tokens, K))
            covs[key] = x.T @ x / tokens
        job = LinearJob(name=lin.name, qtype=qtype, quantizer="gptq", damp=0.01, act_order=False, rank=rank)
        tasks.append((job, lin.weight, covs[key]))
    return tasks


def digest(results) -> str:
    h = hashlib.sha256()
    for r in results:
        for a in (r.dequant, r.packed, *(r.low_rank or ())):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--qtype", default="Q4_K")
    ap.add_argument("--rank", type=int, default=0, help="compensation rank (QERA) in every task (0: none)")
    ap.add_argument("--tokens", type=int, default=512, help="rows of the synthetic calibration activations")
    ap.add_argument("--mode", choices=["sequential", "ray"], default="sequential")
    ap.add_argument("--workers", type=int, default=None, help="ray: start a local Ray with this many CPUs")
    ap.add_argument("--ray-address", default=None, help="ray: join this cluster (HOST:PORT)")
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here")
    a = ap.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t_load = time.perf_counter()
    tasks = layer_tasks(a.model, a.layer, a.qtype, a.rank, a.tokens)
    # (the weights read from the checkpoint now, so both modes time the same work)
    tasks = [(job, np.asarray(w, np.float32), cov) for job, w, cov in tasks]
    t_load = time.perf_counter() - t_load
    nodes = 1
    cpu0, t0 = cpu_self(), time.perf_counter()
    if a.mode == "sequential":
        from edgeq.quant.linear_task import run_linear

        results = [run_linear(job, w, cov) for job, w, cov in tasks]
        wall = time.perf_counter() - t0
    else:
        import ray

        from edgeq.pipeline.split import RaySplit, ray_task

        if a.ray_address:
            ray.init(address=a.ray_address, logging_level="ERROR")
        else:
            ray.init(address="local", num_cpus=a.workers or 1, include_dashboard=False, logging_level="ERROR")
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        cpus = int(ray.cluster_resources().get("CPU", 0))
        warm = ray.remote(num_cpus=1)(ray_task)  # (workers started and edgeq imported before timing)
        from edgeq.quant.linear_task import LinearJob

        tiny = LinearJob("warm", "Q4_0", "rtn", 0.01, False)
        ray.get([warm.remote(tiny, np.ones((32, 32), np.float32), None) for _ in range(cpus)])
        cpu0, t0 = cpu_self(), time.perf_counter()
        with RaySplit().open() as run:
            results = run(tasks)
        wall = time.perf_counter() - t0
        ray.shutdown()
    driver_cpu = cpu_self() - cpu0

    seen: set[int] = set()
    shipped_in = 0
    rows = []
    for (job, w, cov), r in zip(tasks, results):
        R, K = w.shape
        cov_new = id(cov) not in seen
        seen.add(id(cov))
        shipped_in += w.nbytes + (cov.nbytes if cov_new else 0)
        rows.append({"linear": job.name, "shape": [R, K], "weight_bytes": w.nbytes, "cov_bytes": cov.nbytes,
                     "cov_shared_shipped": not cov_new, "out_bytes": r.nbytes,
                     "gflops": gptq_flops(R, K) / 1e9, "task_cpu_s": r.cpu_s})
    task_cpu = sum(r["task_cpu_s"] for r in rows)
    res = {"mode": a.mode, "workers": a.workers, "ray_address": a.ray_address, "nodes": nodes, "qtype": a.qtype,
           "rank": a.rank, "tokens": a.tokens, "wall_s": wall, "driver_cpu_s": driver_cpu, "tasks_cpu_s": task_cpu,
           "shipped_in_bytes": shipped_in, "shipped_out_bytes": sum(r["out_bytes"] for r in rows),
           "gflops": sum(r["gflops"] for r in rows), "load_s": t_load, "digest": digest(results), "tasks": rows}
    print(f"{'linear':<22} {'R x K':>12} {'weight MB':>9} {'cov MB':>8} {'out MB':>7} {'GFLOP':>7} {'task CPU s':>10}")
    for r in rows:
        cov = f"{r['cov_bytes'] / 1e6:.1f}" + ("*" if r["cov_shared_shipped"] else "")
        print(f"{r['linear']:<22} {r['shape'][0]:>5} x {r['shape'][1]:<5} {r['weight_bytes'] / 1e6:>9.1f} {cov:>8} "
              f"{r['out_bytes'] / 1e6:>7.1f} {r['gflops']:>7.1f} {r['task_cpu_s']:>10.1f}")
    print(f"({a.mode}{'' if a.mode == 'sequential' else f', {nodes} node(s)'}) wall {wall:.1f} s, tasks CPU "
          f"{task_cpu:.1f} s, driver CPU {driver_cpu:.1f} s; shipped in {shipped_in / 1e6:.0f} MB (* = covariance "
          f"already shipped), out {res['shipped_out_bytes'] / 1e6:.0f} MB; {res['gflops']:.0f} GFLOP; "
          f"digest {res['digest']}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
