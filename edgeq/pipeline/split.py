"""Work inside one build split into executor tasks: a layer's linears quantized (GPTQ or RTN, then
the compensation branch) as one task per linear (:func:`edgeq.quant.linear_task.run_linear`),
and a layer's calibration shards as one task per shard (:func:`edgeq.calibrate.run_shard`).

A *split* is a small picklable spec the executor leaves in the build context (``ctx.split``; the
in-process executor leaves none: the quantize step then runs as it always did). The quantize step
opens it (:meth:`Split.open`) and hands :func:`edgeq.quant.apply.quantize_ir` a runner that takes
one layer's ``[(job, weight, covariance)]`` and returns their results in order. A task's inputs
are that linear's weight and its input covariance (shared by the linears that read the same
input: q/k/v, gate/up), never the model:

- :class:`ProcessSplit` (``--executor processes``): ``jobs`` worker processes (``spawn``) of
  the step's own; inputs and results travel as ``.npy`` files in a directory of the build's
  temporary directory (read memory-mapped; removed after each layer). A worker that dies breaks
  the pool: a fresh pool runs the layer's unfinished tasks again (up to :data:`MAX_ATTEMPTS`).
- :class:`RaySplit` (``--executor ray``): Ray tasks of one CPU; inputs ``ray.put`` once each into
  the object store (one copy per node that reads it, not one per task), results back through it.
  A task lost with its worker is retried by Ray (``max_retries``): the task has no side effects.

Tasks are submitted heaviest first (:func:`heaviest_first`). A release matrix gets its split from
its executor (:meth:`edgeq.pipeline.executors.Executor.split`); a single-target build from
:func:`open_split` (``edgeq build --target T --executor ...``). The results are the same bytes as
the in-process build's: the same function on the same float32 / float64 values, whatever process
or node runs it.

Calibration (:meth:`Split.open_shards`, used by the calibrate step): per layer, the layer's
weights in the reference runtime's layout (``LayerWeights``) are shipped once (processes: a file
whose arrays are ``.npy`` files, read memory-mapped; Ray: ``ray.put``), each shard's task gets
them and its samples' residual streams, and sends back its float64 sums and the layer's outputs.
At most ``window`` shards are in flight; their sums are handed to the calibration in shard order,
which adds them as they come (the shards' boundaries and the order of the additions are fixed:
the same bits as in-process, for any number of workers).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgeq.blas import one_blas_thread
from edgeq.interrupts import make_temp_dir

MAX_ATTEMPTS = 3  # runs of a task whose worker died (processes; Ray: 1 + RAY_RETRIES)
RAY_RETRIES = MAX_ATTEMPTS - 1

Runner = Callable[[list], list]


class Split:
    name = ""

    def describe(self) -> str:
        return self.name

    @contextlib.contextmanager
    def open(self) -> Iterator[Runner]:
        raise NotImplementedError
        yield

    def shard_workers(self) -> int:
        """Calibration shards this split would run at a time."""
        raise NotImplementedError

    @contextlib.contextmanager
    def open_shards(self, window: int) -> Iterator[Callable]:
        """A calibration shard runner (``edgeq.calibrate.ShardRunner``) running each shard as a
        task, at most ``window`` in flight."""
        raise NotImplementedError
        yield


def _arrays(tasks: list) -> dict[int, np.ndarray]:
    """The distinct inputs of ``tasks`` by the id of their object (a covariance several linears
    read: once), read into arrays: weights float32 (as the in-process build reads them)."""
    seen: dict[int, np.ndarray] = {}
    for _, w, cov in tasks:
        if id(w) not in seen:
            seen[id(w)] = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
        if cov is not None and id(cov) not in seen:
            seen[id(cov)] = np.ascontiguousarray(np.asarray(cov))
    return seen


def _succeeded(f) -> bool:
    return f.done() and not f.cancelled() and f.exception() is None


def heaviest_first(tasks: list) -> list[int]:
    """Task indices by decreasing GPTQ work (``R K^2 + 2/3 K^3`` for an R x K weight: the batched
    updates and the inverse Hessian's factor), so a layer's largest linear (down_proj's K^3) starts
    first and the others fill the other workers meanwhile (ties: in order)."""
    def work(i):
        R, K = (int(x) for x in tasks[i][1].shape)
        return 3 * R * K * K + 2 * K ** 3  # (x3: integers)

    return sorted(range(len(tasks)), key=lambda i: (-work(i), i))


# --- processes: files ---

def file_task(job, w_path: str, cov_path: str | None, out: str) -> dict:
    """One linear in a worker process: inputs from ``.npy`` files, results to ``out.*.npy``."""
    from edgeq.quant.linear_task import run_linear

    w = np.load(w_path, mmap_mode="r")
    cov = None if cov_path is None else np.load(cov_path, mmap_mode="r")
    with one_blas_thread():  # (as in-process steps: edgeq.blas)
        res = run_linear(job, w, cov)
    paths = {"dequant": f"{out}.deq.npy", "packed": f"{out}.packed.npy", "cpu_s": res.cpu_s}
    np.save(paths["dequant"], res.dequant)
    np.save(paths["packed"], res.packed)
    if res.low_rank is not None:
        paths["a"], paths["b"] = f"{out}.a.npy", f"{out}.b.npy"
        np.save(paths["a"], res.low_rank[0])
        np.save(paths["b"], res.low_rank[1])
    return paths


def _read_result(paths: dict):
    from edgeq.quant.linear_task import LinearResult

    low_rank = (np.load(paths["a"]), np.load(paths["b"])) if "a" in paths else None
    return LinearResult(np.load(paths["dequant"]), np.load(paths["packed"]), low_rank, paths["cpu_s"])


def file_shard_task(layer: str, kind: str, xs_path: str, out: str) -> dict:
    """One calibration shard in a worker process: the layer from ``layer`` (:func:`save_object`),
    the shard's residual streams from ``xs_path`` ((samples, T, hidden) float32); its sums and the
    layer's outputs to ``out.*.npy`` (scalars in the returned dict)."""
    from edgeq.calibrate import run_shard
    from edgeq.pipeline.executors import load_object

    hp, L = load_object(layer)
    xs = np.load(xs_path, mmap_mode="r")
    with one_blas_thread():  # (as in-process steps: edgeq.blas)
        parts, ys = run_shard(hp, L, kind, [np.array(x) for x in xs])
    res: dict = {"ys": f"{out}.ys.npy", "arrays": {}, "scalars": {}}
    np.save(res["ys"], np.stack(ys))
    for name, v in parts.items():
        if isinstance(v, np.ndarray):
            res["arrays"][name] = f"{out}.{name}.npy"
            np.save(res["arrays"][name], v)  # (a Fortran-ordered sum stays Fortran-ordered)
        else:
            res["scalars"][name] = v
    return res


def _read_shard(res: dict) -> tuple[dict, list]:
    parts = {name: np.load(path, mmap_mode="r") for name, path in res["arrays"].items()}
    parts.update(res["scalars"])
    return parts, list(np.load(res["ys"]))


class ProcessSplit(Split):
    name = "processes"

    def __init__(self, root: str, jobs: int):
        self.root, self.jobs = str(root), int(jobs)

    def describe(self) -> str:
        return f"{self.jobs} worker processes"

    def shard_workers(self) -> int:
        return self.jobs

    @contextlib.contextmanager
    def open_shards(self, window: int) -> Iterator[Callable]:
        with self._pool_in("shards.") as (pool, d):
            yield lambda hp, L, kind, n, inputs: self._shards(pool, d, max(1, int(window)), hp, L, kind, n, inputs)

    def _shards(self, pool: list, root: Path, window: int, hp, L, kind: str, n: int, inputs) -> Iterator:
        """A layer's ``n`` shards as tasks, ``window`` at a time, results in shard order; a worker
        that dies breaks the pool: a fresh pool runs the unfinished shards again (a shard at most
        MAX_ATTEMPTS times)."""
        from concurrent.futures.process import BrokenProcessPool

        from edgeq.pipeline.executors import save_object

        d = Path(tempfile.mkdtemp(prefix="layer.", dir=root))
        try:
            layer = save_object((hp, L), d, prefix="weights.")
            args: dict[int, tuple] = {}
            futs: dict = {}
            runs = [0] * n

            def submit(k: int) -> None:
                if k not in args:  # (the inputs are read when the shard is first submitted)
                    xs_path = str(d / f"in{k:05d}.npy")
                    np.save(xs_path, np.stack(inputs(k)))
                    args[k] = (layer, kind, xs_path, str(d / f"out{k:05d}"))
                futs[k] = pool[0].submit(file_shard_task, *args[k])  # (raises on a pool already broken)
                runs[k] += 1

            nxt, again = 0, []
            for k in range(n):
                while True:
                    try:  # a worker that died breaks the pool: seen by a result or by the next submit
                        while again:
                            submit(again[0])
                            again.pop(0)
                        while nxt < n and len(futs) < window:
                            submit(nxt)
                            nxt += 1
                        res = futs[k].result()
                        break
                    except BrokenProcessPool:  # a fresh pool runs this shard and the other unfinished ones
                        if runs[k] >= MAX_ATTEMPTS:
                            raise
                        pool[0].shutdown(wait=False, cancel_futures=True)
                        pool[0] = self._pool()
                        again = sorted(j for j, f in futs.items() if not _succeeded(f))
                del futs[k]
                parts, ys = _read_shard(res)
                yield parts, ys
                del parts, ys
                for p in [d / f"in{k:05d}.npy", *d.glob(f"out{k:05d}.*.npy")]:  # (this shard's files)
                    p.unlink(missing_ok=True)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _pool(self):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"))

    @contextlib.contextmanager
    def _pool_in(self, prefix: str):
        """(pool holder, a scratch directory of the build's): the pool is replaced when a worker
        dies; on an error the workers are stopped rather than waited for; both go at the end."""
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
        pool = [self._pool()]
        try:
            yield pool, d
        except BaseException:  # stop the workers rather than wait for their tasks
            for proc in list((getattr(pool[0], "_processes", None) or {}).values()):
                proc.terminate()
            raise
        finally:
            pool[0].shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(d, ignore_errors=True)

    @contextlib.contextmanager
    def open(self) -> Iterator[Runner]:
        with self._pool_in("split.") as (pool, d):
            yield lambda tasks: self._layer(pool, d, tasks)

    def _layer(self, pool: list, root: Path, tasks: list) -> list:
        from concurrent.futures.process import BrokenProcessPool

        d = Path(tempfile.mkdtemp(prefix="layer.", dir=root))
        try:
            files = {}
            for i, (key, a) in enumerate(_arrays(tasks).items()):
                files[key] = str(d / f"in{i:03d}.npy")
                np.save(files[key], a)
            args = [(job, files[id(w)], None if cov is None else files[id(cov)], str(d / f"out{i:03d}"))
                    for i, (job, w, cov) in enumerate(tasks)]
            done: dict[int, dict] = {}
            for attempt in range(1, MAX_ATTEMPTS + 1):
                futs, broken = {}, None
                try:  # a worker that died breaks the pool: seen by a result or by a later submit
                    for i in heaviest_first(tasks):
                        if i not in done:
                            futs[i] = pool[0].submit(file_task, *args[i])
                except BrokenProcessPool as exc:
                    broken = exc
                for i, f in futs.items():
                    try:
                        done[i] = f.result()
                    except BrokenProcessPool as exc:  # its tasks and the pool's others
                        broken = exc
                if broken is None:
                    break
                if attempt == MAX_ATTEMPTS:
                    raise broken
                pool[0].shutdown(wait=False, cancel_futures=True)
                pool[0] = self._pool()
            return [_read_result(done[i]) for i in range(len(args))]
        finally:
            shutil.rmtree(d, ignore_errors=True)


# --- Ray: the object store ---

def ray_task(job, w, cov):
    """One linear on a Ray worker (``w``, ``cov``: resolved from the object store)."""
    from edgeq.quant.linear_task import run_linear

    with one_blas_thread():  # (as in-process steps: edgeq.blas)
        return run_linear(job, w, cov)


def ray_shard_task(layer, kind: str, xs: np.ndarray):
    """One calibration shard on a Ray worker (``layer``: (hparams, LayerWeights) from the object
    store; ``xs``: the shard's residual streams, (samples, T, hidden) float32)."""
    from edgeq.calibrate import run_shard

    hp, L = layer
    with one_blas_thread():  # (as in-process steps: edgeq.blas)
        parts, ys = run_shard(hp, L, kind, [np.array(x) for x in xs])
    return parts, np.stack(ys)


def _owned(res):
    """A result copied out of the object store (its buffers are then free to go)."""
    from edgeq.quant.linear_task import LinearResult

    lr = None if res.low_rank is None else tuple(np.array(x) for x in res.low_rank)
    return LinearResult(np.array(res.dequant), np.array(res.packed), lr, res.cpu_s)


class RaySplit(Split):
    name = "ray"

    def describe(self) -> str:
        return "Ray tasks"

    @contextlib.contextmanager
    def open(self) -> Iterator[Runner]:
        from edgeq.pipeline.ray_executor import import_ray

        ray = import_ray()
        remote = ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(ray_task)
        refs: list = []

        def layer(tasks: list) -> list:
            put = {key: ray.put(a) for key, a in _arrays(tasks).items()}
            outs: list = [None] * len(tasks)
            for i in heaviest_first(tasks):
                job, w, cov = tasks[i]
                outs[i] = remote.remote(job, put[id(w)], None if cov is None else put[id(cov)])
            refs[:] = outs
            results = [_owned(r) for r in ray.get(outs)]
            refs.clear()
            del put, outs  # (their objects leave the store)
            return results

        try:
            yield layer
        except BaseException:
            for r in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(r, force=True)
            raise

    def shard_workers(self) -> int:
        """The cluster's CPUs (a shard task takes one)."""
        from edgeq.pipeline.ray_executor import import_ray

        return max(1, int(import_ray().cluster_resources().get("CPU", 1)))

    @contextlib.contextmanager
    def open_shards(self, window: int) -> Iterator[Callable]:
        from edgeq.pipeline.ray_executor import import_ray

        ray = import_ray()
        remote = ray.remote(num_cpus=1, max_retries=RAY_RETRIES)(ray_shard_task)
        refs: list = []
        window = max(1, int(window))

        def shards(hp, L, kind, n, inputs):
            layer = ray.put((hp, L))  # (once per layer: each node reads one copy)
            pending: deque = deque()
            nxt = 0
            try:
                for _ in range(n):
                    while nxt < n and len(pending) < window:
                        pending.append(remote.remote(layer, kind, np.stack(inputs(nxt))))
                        nxt += 1
                    refs[:] = list(pending)
                    parts, ys = ray.get(pending.popleft())
                    ys = list(np.array(ys))  # (copied out of the store; the sums are added from it)
                    yield parts, ys
                    del parts, ys
            finally:
                refs.clear()
                del layer

        try:
            yield shards
        except BaseException:
            for r in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(r, force=True)
            raise


# --- a single-target build ---

@contextlib.contextmanager
def open_split(executor: str | None, work_dir: Path, jobs: int | None = None,
               address: str | None = None) -> Iterator[Split | None]:
    """The split of a single-target build's own work for ``--executor`` / ``--ray-address``
    (None or inprocess: none). Its temporary directory lives under ``work_dir`` until the end."""
    from edgeq.pipeline.executors import Processes, make_executor

    ex = make_executor(executor, work_dir, jobs, address)
    if ex.name == "inprocess":
        yield None
        return
    if isinstance(ex, Processes):  # (no pool of matrix workers: the split's own pool is enough)
        work_dir.mkdir(parents=True, exist_ok=True)
        root = make_temp_dir(".edgeq-split.", work_dir)
        try:
            yield ProcessSplit(str(root), ex.jobs)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    with ex.session(None) as s:
        yield s.split()
