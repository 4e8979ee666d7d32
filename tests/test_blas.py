"""edgeq.blas.one_blas_thread holds every BLAS library a build step uses to one thread, so the
LAPACK / BLAS results the passes depend on are the same bits whatever the thread count asked by
the environment (issue 18's determinism). The oracle: the same computation in a process that
was given one thread from the start. edgeq.blas.syrk_lower (calibration's Gram update without the
GIL held) is scipy's dsyrk, bit for bit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.linalg.blas import dsyrk

from edgeq.blas import syrk_lower

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


@pytest.mark.parametrize("k, n", [(1, 1), (7, 5), (32, 64), (300, 129), (16, 1030)])
def test_syrk_lower_is_scipys_dsyrk_bit_for_bit(k, n):
    """The same BLAS call as scipy's f2py wrapper (uplo L, trans T, a Fortran float64 copy of x):
    the same bits, on float32 and float64, C- and Fortran-ordered inputs, accumulated twice."""
    rng = np.random.default_rng(k * 1000 + n)
    for dtype, order in ((np.float32, "C"), (np.float64, "C"), (np.float32, "F")):
        xs = [np.asarray(rng.standard_normal((k, n)), dtype=dtype, order=order) for _ in range(2)]
        acc = np.asfortranarray(rng.standard_normal((n, n)))
        init, want = acc.copy(), acc.copy(order="F")
        for x in xs:
            syrk_lower(acc, x)
            want = dsyrk(1.0, np.asarray(x, dtype=np.float64), beta=1.0, c=want, trans=1, lower=1, overwrite_c=1)
        assert acc.tobytes(order="F") == want.tobytes(order="F"), (dtype, order)
        # and what it means (numpy's float64 products): the lower triangle gained x^T x, the upper is untouched
        gram = sum(np.asarray(x, np.float64).T @ np.asarray(x, np.float64) for x in xs)
        np.testing.assert_allclose(np.tril(acc), np.tril(init + gram), rtol=1e-12, atol=1e-12)
        assert np.array_equal(np.triu(acc, 1), np.triu(init, 1))


def test_syrk_lower_refuses_a_sum_it_cannot_update():
    x = np.ones((4, 3), np.float32)
    for bad in (np.zeros((3, 3)), np.zeros((3, 3), np.float32, order="F"), np.zeros((4, 4), order="F")):
        with pytest.raises(ValueError, match="syrk_lower"):
            syrk_lower(bad, x)
    ro = np.zeros((3, 3), order="F")
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="syrk_lower"):
        syrk_lower(ro, x)


def test_inverse_cholesky_lower_is_scipys_potrf_trtri_without_the_gil():
    import threading
    import time

    import numpy as np
    from scipy.linalg import lapack

    from edgeq.blas import inverse_cholesky_lower

    rng = np.random.default_rng(3)
    x = rng.standard_normal((900, 600))
    a = x.T @ x + 600 * np.eye(600)
    L, info = lapack.dpotrf(a, lower=1, clean=1)
    want, info2 = lapack.dtrtri(L, lower=1)
    got = np.asfortranarray(a)
    assert info == info2 == 0 and inverse_cholesky_lower(got) == 0
    assert np.array_equal(got, want)  # the same routines: the same bits, upper triangle zeroed
    bad = np.asfortranarray(-np.eye(5))
    assert inverse_cholesky_lower(bad) > 0
    with pytest.raises(ValueError):
        inverse_cholesky_lower(np.ascontiguousarray(a[:, :599]))
    # the GIL is released: a Python thread keeps counting while a large factorisation runs
    big = np.asfortranarray(rng.standard_normal((2500, 2500)))
    big = np.asfortranarray(big.T @ big + 2500 * np.eye(2500))
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1

    t = threading.Thread(target=count)
    t0 = time.process_time()
    t.start()
    inverse_cholesky_lower(big)
    done.set()
    t.join()
    assert ticks[0] > 10_000, ticks[0]
