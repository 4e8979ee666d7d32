"""edgeq.blas.one_blas_thread holds every BLAS library a build step uses to one thread, so the
LAPACK / BLAS results the passes depend on are the same bits whatever the thread count asked by
the environment (issue 18's determinism). The oracle: the same computation in a process that
was given one thread from the start."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh process (scipy not yet imported, as in a build): inside the pin, report every
# BLAS library's thread count and hash what the passes compute with it, at sizes where OpenBLAS
# splits the work between threads.
_CHILD = r"""
import hashlib, json
import numpy as np
from edgeq.blas import one_blas_thread
rng = np.random.default_rng(7)
z = rng.standard_normal((256, 1536))
with one_blas_thread():
    from threadpoolctl import threadpool_info
    from edgeq.passes.sort_mlp import mlp_scores
    from scipy.linalg import lapack
    from scipy.linalg.blas import dsyrk
    c = dsyrk(1.0, np.asfortranarray(z), trans=1, lower=0)
    c = np.triu(c) + np.triu(c, 1).T
    out = {
        "threads": sorted({i["filepath"].rsplit("/", 1)[-1]: i["num_threads"]
                           for i in threadpool_info() if i["user_api"] == "blas"}.items()),
        "syrk": hashlib.sha256(c.tobytes()).hexdigest(),
        # scipy's LAPACK, as the MLP sort of a wide model (potrf) and the planner (cholesky) call it
        "potrf": hashlib.sha256(lapack.dpotrf(c + 1536 * np.eye(1536), lower=1, clean=1)[0].tobytes()).hexdigest(),
        "scores": hashlib.sha256(mlp_scores(c).tobytes()).hexdigest(),
        "sgemm": hashlib.sha256((z[:32].astype(np.float32) @ z.T.astype(np.float32)).tobytes()).hexdigest(),
    }
print(json.dumps(out))
"""


def _run(threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    p = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_every_blas_library_runs_one_thread_inside_a_build_step():
    got = _run(2)
    libs = dict(got["threads"])
    assert any("scipy" in name for name in libs), f"scipy's BLAS is not among those limited: {libs}"
    assert set(libs.values()) == {1}, libs


def test_lapack_and_blas_results_do_not_depend_on_the_thread_count_asked():
    one, two = _run(1), _run(2)
    for key in ("syrk", "potrf", "scores", "sgemm"):
        assert one[key] == two[key], key
