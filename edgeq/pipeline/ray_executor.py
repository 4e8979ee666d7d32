"""The Ray executor of a release matrix: ``--executor ray`` (start or join a local Ray instance),
``--executor ray://HOST:PORT`` (a Ray Client address) or ``--ray-address HOST:PORT`` (a cluster's
GCS address, from a node of that cluster).

Tasks (segments of shared steps, members' tails: :mod:`edgeq.pipeline.executors`) run as Ray
tasks of one CPU each, wherever the cluster places them. A context travels as the processes
executor sends it: a file in the build's temporary directory whose large arrays are ``.npy``
files read back memory-mapped and whose spilled weights are file names; a task's arguments are
a few paths and the step configs, never the model. Every node must therefore see the build's
output directory, the model and the calibration data at the same paths (one machine, or shared
storage): before the build a probe task on every node checks that it reads the build's
directory and runs the same edgeq; a node that does not is one error line, nothing built.

A task whose worker or node died comes back as *lost* (:meth:`RayExecutor.lost`) and the matrix
runs it again (Ray's own task retries are off, so that the matrix removes what a killed tail
left beside its output and logs the retry). Ray is imported here only, when this executor is
chosen; without it the build stops with one error line naming the extra to install.

Inside a build, the quantize step's linears run as Ray tasks of their own (:class:`RaySplit
<edgeq.pipeline.split.RaySplit>`, :meth:`RayExecutor.split`): their inputs go through the
object store, not through files, and Ray retries them itself (they have no side effects).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.interrupts import make_temp_dir
from edgeq.pipeline.executors import Executor, save_context, segment_task, tail_task

RAY_EXTRA = "pip install 'edgeq[ray]'"
PROBE_TIMEOUT_S = 120.0
CONNECT_ATTEMPTS = 3  # a ray:// client whose server failed to start (transient) tries again


def import_ray():
    try:
        import ray
    except ImportError:
        raise EdgeqError(f"--executor ray needs Ray, which is not installed ({RAY_EXTRA})") from None
    return ray


# --- worker side ---

_store = None  # this worker's spill store (a worker outlives a build: one store per build directory)


def _spill_into(root: str) -> None:
    """Spill into a directory of this worker's own under ``root`` (the build's temp dir, removed
    when the matrix ends), made on the worker's first task of that build."""
    global _store
    from edgeq.spill import SpillStore, drop_store, push_store

    if _store is not None and _store.root.parent == Path(root):
        return
    if _store is not None:
        drop_store(_store)
    _store = SpillStore(Path(tempfile.mkdtemp(prefix=f"spill.{os.getpid()}.", dir=root)))
    push_store(_store)


def _ray_segment(seg, path: str, alive: list[str], root: str):
    _spill_into(root)
    return segment_task(seg, path, alive, root)


def _ray_tail(member, path: str, root: str):
    _spill_into(root)
    return tail_task(member, path)


def _probe(marker: str) -> tuple[bool, str]:
    """On one node: does it see the build's directory, and which edgeq does it run?"""
    from edgeq import __version__

    return Path(marker).is_file(), __version__


# --- driver side ---

class RayExecutor(Executor):
    """Tasks on a Ray cluster; contexts through files in a temp dir under ``work_dir`` (removed at
    the end). ``address``: None (join the instance ``ray start`` began on this machine, or start
    one with ``jobs`` CPUs), ``ray://HOST:PORT`` or ``HOST:PORT``."""

    name = "ray"

    def __init__(self, work_dir: Path, address: str | None = None, jobs: int | None = None):
        self.ray = import_ray()
        self.work_dir, self.address, self.jobs = Path(work_dir), address, jobs
        self.root: Path | None = None
        self.refs: list = []
        self._segment = self._tail = None

    @contextlib.contextmanager
    def session(self, ctx):
        ray = self.ray
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.root = make_temp_dir(".edgeq-matrix.", self.work_dir)
        owned = False
        try:
            if not ray.is_initialized():
                self._connect()
                owned = True
            opts = {"num_cpus": 1, "max_retries": 0}
            self._segment = ray.remote(**opts)(_ray_segment)
            self._tail = ray.remote(**opts)(_ray_tail)
            self._check_nodes()
            yield self
        except BaseException:  # Ctrl-C, a bug: stop the tasks still running rather than wait for them
            for r in self.refs:
                with contextlib.suppress(Exception):
                    ray.cancel(r, force=True)
            raise
        finally:
            self.refs = []
            if owned:
                ray.shutdown()
            shutil.rmtree(self.root, ignore_errors=True)

    def _connect(self) -> None:
        ray = self.ray
        env = {k: v for k, v in os.environ.items() if k.startswith("EDGEQ_")}  # (as spawned processes inherit them)
        kw: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
        if env:
            kw["runtime_env"] = {"env_vars": env}
        where = self.address or "this machine"
        try:
            if self.address:
                for attempt in range(CONNECT_ATTEMPTS):
                    try:
                        ray.init(address=self.address, **kw)
                        return
                    except Exception as exc:  # noqa: BLE001
                        # the client server could not start this client's own server (seen when a
                        # client connects right after another one left): transient, try again
                        if "Initialization failure" not in str(exc) or attempt == CONNECT_ATTEMPTS - 1:
                            raise
                        ray.shutdown()
                        time.sleep(2.0 * (attempt + 1))
            try:  # an instance `ray start` began on this machine (or RAY_ADDRESS)
                ray.init(address="auto", **kw)
            except ConnectionError:
                ray.init(num_cpus=self.jobs or os.cpu_count() or 1, include_dashboard=False, **kw)
        except EdgeqError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray's connection errors come in several classes
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
            raise EdgeqError(f"--executor ray: cannot connect to Ray at {where}: {first}") from None

    def _check_nodes(self) -> None:
        """Every alive node runs a probe: it must read a file just written in the build's temp dir
        and import the same edgeq version."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from edgeq import __version__

        ray = self.ray
        marker = self.root / "probe"
        marker.write_text(__version__)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(num_cpus=0, max_retries=1)(_probe)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes]
        try:
            seen = ray.get(refs, timeout=PROBE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a node that cannot import edgeq, or does not answer
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[-1]
            raise EdgeqError(f"--executor ray: a node of the cluster cannot run edgeq tasks ({first})") from None
        for n, (found, version) in zip(nodes, seen):
            where = n.get("NodeManagerAddress", n["NodeID"])
            if version != __version__:
                raise EdgeqError(f"--executor ray: node {where} runs edgeq {version}, this build {__version__}")
            if not found:
                raise EdgeqError(f"--executor ray: node {where} does not see {self.root} (every node needs the "
                                 f"output directory, the model and the data at the same paths: shared storage)")
        marker.unlink()

    def lost(self, exc):
        from ray import exceptions as rx

        kinds = tuple(getattr(rx, n) for n in ("WorkerCrashedError", "NodeDiedError", "ObjectLostError",
                                               "LocalRayletDiedError", "OutOfMemoryError") if hasattr(rx, n))
        return isinstance(exc, kinds)

    def split(self):
        from edgeq.pipeline.split import RaySplit

        return RaySplit()

    def store(self, ctx):
        return save_context(ctx, self.root)

    def submit_segment(self, seg, ref, alive):
        r = self._segment.remote(seg, ref, alive, str(self.root))
        self.refs.append(r)
        return r.future()

    def submit_tail(self, member, ref):
        r = self._tail.remote(member, ref, str(self.root))
        self.refs.append(r)
        return r.future()
