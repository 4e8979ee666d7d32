"""Executors of a release matrix (:func:`edgeq.pipeline.matrix.run_matrix`).

An executor runs two kinds of task: a *segment* (a chain of shared steps for a group of targets,
from a stored context to a stored context) and a member's *tail* (lowering, goldens, manifest:
from a stored context to an artifact directory and an :class:`~edgeq.pipeline.matrix.Outcome`).

- ``inprocess`` (default): tasks run in this process, one after another; contexts are objects.
- ``processes``: tasks run in worker processes (``spawn``), independent ones at the same time.
  A context travels as a file in the build's temporary directory: every numpy array of 64 KiB or
  more is written as its own ``.npy`` file and read back memory-mapped, spilled weights
  (``edgeq.spill``) travel as their file names, so a model is never pickled into a task. Workers
  spill into the same temporary directory, kept until the whole matrix ends.
- ``ray``, ``ray://HOST:PORT`` (or ``ray`` with an address): tasks on a Ray cluster, contexts as
  files the same way (:mod:`edgeq.pipeline.ray_executor`; Ray is imported only then).

The processes and Ray executors also split work inside a build (:meth:`Executor.split`, the
spec left in the starting context: :mod:`edgeq.pipeline.split`); in-process, nothing is split.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeq.interrupts import make_temp_dir
from edgeq.pipeline.matrix import Member, Outcome, Segment, finish, fork, run_segment
from edgeq.pipeline.runner import BuildContext

EXECUTORS = ("inprocess", "processes", "ray", "ray://HOST:PORT")

# Arrays at least this large travel as their own file (memory-mapped on the other side).
FILE_ARRAY_BYTES = 1 << 16


class Executor:
    name = ""

    @contextlib.contextmanager
    def session(self, ctx: BuildContext) -> Iterator["Executor"]:
        yield self

    def split(self):
        """How a build's own work is split into tasks (:mod:`edgeq.pipeline.split`; None: not)."""
        return None

    def store(self, ctx: BuildContext):
        raise NotImplementedError

    def submit_segment(self, seg: Segment, ref, alive: list[str]) -> Future:
        raise NotImplementedError

    def submit_tail(self, member: Member, ref) -> Future:
        raise NotImplementedError

    def lost(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the task's worker died (the task may be run again)."""
        return False

    def recover(self) -> None:
        """Make the executor usable again after a lost worker."""

    def log(self, msg: str) -> None:
        import click

        click.echo(msg, err=True)

    def wait_one(self, futures: list[Future]) -> Future:
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        return next(f for f in futures if f in done)  # (in submission order: deterministic logs)


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class InProcess(Executor):
    """Every task in this process, in order; a context is shared by reference (forked per task)."""

    name = "inprocess"

    def store(self, ctx):
        return ctx

    def submit_segment(self, seg, ref, alive):
        return _done(run_segment(seg, fork(ref), alive))

    def submit_tail(self, member, ref):
        return _done(finish(member, ref))


# --- contexts as files ---

class _Pickler(pickle.Pickler):
    def __init__(self, f, root: Path):
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.root, self.n, self.seen = root, 0, {}

    def persistent_id(self, obj):
        from edgeq.lazy import LazyArray64, LazyTensor

        if isinstance(obj, LazyArray64):
            return ("lazy64", str(obj.path), tuple(obj.shape))
        if isinstance(obj, LazyTensor):
            return ("lazy", str(obj.path), int(obj.offset), obj.stored, tuple(obj.shape))
        if isinstance(obj, np.ndarray) and obj.dtype != object and obj.nbytes >= FILE_ARRAY_BYTES:
            key = id(obj)
            if key not in self.seen:
                self.n += 1
                path = self.root / f"{self.n:06d}.npy"
                np.save(path, obj, allow_pickle=False)
                self.seen[key] = (str(path), obj)  # (keep obj alive: ids stay unique)
            return ("npy", self.seen[key][0])
        return None


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid):
        from edgeq.lazy import LazyArray64, LazyTensor

        kind = pid[0]
        if kind == "npy":
            return np.load(pid[1], mmap_mode="r")
        if kind == "lazy64":
            return LazyArray64(pid[1], pid[2])
        if kind == "lazy":
            return LazyTensor(pid[1], pid[2], pid[3], pid[4])
        raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")


def save_object(obj, root: Path, prefix: str = "obj.") -> str:
    """``obj`` as a file under ``root`` (a fresh directory of its own: its arrays of
    FILE_ARRAY_BYTES or more as ``.npy`` files beside it, spilled tensors as their file names);
    returns the file name. Read back by :func:`load_object` (arrays memory-mapped)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    with open(d / "object.pkl", "wb") as f:
        _Pickler(f, d).dump(obj)
    return str(d / "object.pkl")


def load_object(path: str):
    with open(path, "rb") as f:
        return _Unpickler(f).load()


def save_context(ctx: BuildContext, root: Path) -> str:
    """``ctx`` as a file under ``root`` (:func:`save_object`); returns the file name."""
    return save_object(ctx, root, prefix="ctx.")


def load_context(path: str) -> BuildContext:
    return load_object(path)


# --- worker side ---

_worker_spill = None


def _worker_init(spill_root: str) -> None:
    """Each worker spills into its own directory under the build's temp dir, kept to the end."""
    global _worker_spill
    from edgeq.spill import SpillStore, push_store

    d = Path(tempfile.mkdtemp(prefix=f"spill.{os.getpid()}.", dir=spill_root))
    _worker_spill = SpillStore(d)
    push_store(_worker_spill)


def segment_task(seg: Segment, path: str, alive: list[str], root: str):
    """A segment run in a worker (processes, ray): its context read from ``path``, the result
    stored under ``root``."""
    ctx, alive, failures, runs = run_segment(seg, load_context(path), alive)
    ref = save_context(ctx, Path(root)) if alive else None
    return ref, alive, failures, runs


def tail_task(member: Member, path: str) -> Outcome:
    """A member's tail run in a worker (processes, ray), from the context file ``path``."""
    return finish(member, load_context(path))


class Processes(Executor):
    """Tasks in worker processes (``jobs`` at a time); contexts through files in a temp dir
    under ``work_dir`` (removed at the end)."""

    name = "processes"

    def __init__(self, work_dir: Path, jobs: int | None = None):
        self.work_dir, self.jobs = Path(work_dir), jobs or os.cpu_count() or 1
        self.pool: ProcessPoolExecutor | None = None
        self.root: Path | None = None

    @contextlib.contextmanager
    def session(self, ctx):
        import shutil

        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.root = make_temp_dir(".edgeq-matrix.", self.work_dir)
        try:
            self.pool = self._new_pool()
            yield self
        except BaseException:  # Ctrl-C, SIGTERM, a bug: stop the workers rather than wait for their tasks
            for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
                proc.terminate()
            raise
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            shutil.rmtree(self.root, ignore_errors=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init, initargs=(str(self.root),))

    def lost(self, exc):
        from concurrent.futures.process import BrokenProcessPool

        return isinstance(exc, BrokenProcessPool)

    def recover(self):
        """A dead worker breaks the whole pool (its other tasks come back lost too and are retried):
        a fresh pool, once per breakage."""
        if self.pool is not None and getattr(self.pool, "_broken", False):
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()

    def split(self):
        from edgeq.pipeline.split import ProcessSplit

        return ProcessSplit(str(self.root), self.jobs)

    def store(self, ctx):
        return save_context(ctx, self.root)

    def submit_segment(self, seg, ref, alive):
        return self.pool.submit(segment_task, seg, ref, alive, str(self.root))

    def submit_tail(self, member, ref):
        return self.pool.submit(tail_task, member, ref)


def make_executor(name: str | None, work_dir: Path, jobs: int | None = None, address: str | None = None) -> Executor:
    """``name``: inprocess, processes, ray or ray://HOST:PORT (None: inprocess, or ray when an
    ``address`` is given); ``address`` (``--ray-address``): the Ray cluster to join."""
    from edgeq.errors import EdgeqError

    if name is None:
        name = "ray" if address is not None else "inprocess"
    if name.startswith("ray://"):
        if address is not None and address != name:
            raise EdgeqError(f"--executor {name} and --ray-address {address}: two different clusters")
        name, address = "ray", name
    if address is not None and name != "ray":
        raise EdgeqError(f"--ray-address applies to --executor ray, not {name}")
    if address is not None and not address.strip():
        raise EdgeqError("--ray-address: empty address")
    if name == "inprocess":
        return InProcess()
    if name == "processes":
        return Processes(work_dir, jobs)
    if name == "ray":
        from edgeq.pipeline.ray_executor import RayExecutor

        return RayExecutor(work_dir, address=address, jobs=jobs)
    raise EdgeqError(f"unknown executor {name!r} (available: {', '.join(EXECUTORS)})")
