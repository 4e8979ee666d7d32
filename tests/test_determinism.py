"""Builds are byte-identical across processes, thread counts and hash seeds, for every format
(issue 18): each build runs twice in its own process, once with one thread (EDGEQ_THREADS,
OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS = 1) and PYTHONHASHSEED=0, once with two
threads and PYTHONHASHSEED=4242; every file of the two artifacts (manifest and goldens
included) must be the same bytes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CALIB = ["--calib-samples", "4", "--calib-len", "64"]
BUILDS = {
    "gguf-bits": ["--bits", "4"],
    "gguf-planned": ["--bpw", "5.5", *CALIB],
    "gguf-pruned": ["--bits", "8", "--prune-rates", "0,0.5", *CALIB],
    # 12 samples: two calibration shards (edgeq.calibrate.SHARD_SAMPLES), on 1 vs 2 worker threads
    "gguf-pruned-shards": ["--bits", "8", "--prune-rates", "0,0.5", "--calib-samples", "12", "--calib-len", "32"],
    # the measured allocation's torch probe at 1 vs 2 threads must give the same widths and manifest;
    # with the per-rate biases and goldens (the reference runtime at MLP-pruned widths: float32 GEMMs,
    # whose bits depend on OpenBLAS's thread count on some CPUs, edgeq.blas)
    "gguf-pruned-measured": ["--bits", "8", "--prune-rates", "0,0.25", "--prune-dims", "mlp",
                             "--importance", "measured", "--prune-bias", *CALIB],
    # FLAP: the fluctuation sort and its allocation across layers (standardised scores, a greedy on
    # their sums rounded to 6 digits) give the same widths whatever the thread count
    "gguf-pruned-flap": ["--bits", "8", "--prune-rates", "0,0.25", "--prune-dims", "mlp", "--sort", "flap",
                         "--importance", "fluctuation", "--prune-bias", *CALIB],
    "onnx": ["--format", "onnx", "--bits", "4"],
    "tvm": ["--format", "tvm", "--bits", "4"],
    "reference": ["--format", "reference"],
}


def _env(threads: int, hashseed: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONHASHSEED=str(hashseed))
    for k in ("EDGEQ_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env


@pytest.mark.parametrize("kind", list(BUILDS))
def test_build_is_byte_identical_across_processes_threads_and_hash_seeds(kind, tiny_llama, tmp_path):
    outs = [tmp_path / "t1-h0", tmp_path / "t2-h4242"]
    procs = [subprocess.Popen([sys.executable, "-m", "edgeq.cli", "build", str(tiny_llama), *BUILDS[kind],
                               "-o", str(out)], env=_env(threads, seed), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for out, threads, seed in zip(outs, (1, 2), (0, 4242))]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    assert "manifest.json" in names and len(names) >= 2
    differ = [n for n in names if (outs[0] / n).read_bytes() != (outs[1] / n).read_bytes()]
    assert differ == [], f"{kind}: {differ} differ between the two processes"
