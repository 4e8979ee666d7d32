"""The Ray executor (edgeq.pipeline.ray_executor) on a two-node Ray cluster on this machine (a head
and a worker node on the loopback address, one CPU each): release artifacts byte-identical to the
in-process build, the quantize step's linears as Ray tasks (edgeq.pipeline.split; matrix and
single build) with the same bytes, a worker killed mid-build retried, a failing target reported
while the other completes, and one-line errors for bad executor input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from release_trees import leftovers, run_cli, same_tree

import edgeq

REPO = Path(edgeq.__file__).resolve().parent.parent
PRUNED = ["--bits", "4", "--prune-rates", "0,0.25", "--calib-samples", "4", "--calib-len", "32"]
TARGETS = "cpu-avx2,mobile-arm64"
MEMBERS = ("cpu-avx2-gguf", "mobile-arm64-gguf")  # (the release's member directories)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A head and a worker node started with `ray start --block`, each in its own process group
    (stopped by group id, whatever the test did)."""

    def __init__(self):
        self.port, self.client_port = free_port(), free_port()
        # (a short path: Ray's unix sockets live under it)
        self.tmp = Path(tempfile.mkdtemp(prefix="edgeq-ray.", dir="/tmp"))
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> None:
        ray = Path(sys.executable).parent / "ray"
        log = open(self.tmp / f"node{len(self.procs)}.log", "wb")
        self.procs.append(subprocess.Popen(
            [str(ray), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--object-store-memory=200000000", "--disable-usage-stats", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def pgids(self) -> set[int]:  # (each `ray start` leads its own process group: its pid)
        return {p.pid for p in self.procs}

    def wait_nodes(self, n: int, timeout: float = 120.0) -> None:
        import ray

        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:  # (a node that could not start: its log, at once)
                assert p.poll() is None, (self.tmp / f"node{self.procs.index(p)}.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"the Ray cluster did not reach {n} nodes"
            with socket.socket() as s:
                up = s.connect_ex(("127.0.0.1", self.port)) == 0
            if up:
                ray.init(address=f"127.0.0.1:{self.port}", logging_level="ERROR", log_to_driver=False)
                alive = [x for x in ray.nodes() if x["Alive"]]
                ray.shutdown()
                if len(alive) >= n:
                    return
            time.sleep(1.0)

    def stop(self) -> None:
        for p in self.procs:  # `ray start --block` stops its node's processes on SIGTERM
            with_group(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            with_group(p.pid, signal.SIGKILL)  # (whatever is left of the group)
            p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def with_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster():
    # a loopback-only test cluster: no token authentication (set for the nodes and for the drivers,
    # this process and the build subprocess, whatever ~/.ray/auth_token holds)
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    c = Cluster()
    try:
        c.start("--head", f"--port={c.port}", f"--ray-client-server-port={c.client_port}",
                "--include-dashboard=false", f"--temp-dir={c.tmp}")
        c.wait_nodes(1)
        c.start(f"--address=127.0.0.1:{c.port}")
        c.wait_nodes(2)
        yield c
    finally:
        c.stop()
        mp.undo()


@pytest.fixture(scope="module")
def inprocess_release(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "release"
    code, text = run_cli("build", tiny_llama, "--target", TARGETS, *PRUNED, "-o", out)
    assert code == 0, text
    return out


def test_two_node_cluster_gives_the_inprocess_bytes(cluster, inprocess_release, tiny_llama, tmp_path):
    out = tmp_path / "release-ray"
    code, text = run_cli("build", tiny_llama, "--target", TARGETS, *PRUNED, "--ray-address", f"127.0.0.1:{cluster.port}",
                         "-o", out)
    assert code == 0, text
    assert "executor ray" in text
    same_tree(out, inprocess_release)
    assert [p.name for p in tmp_path.iterdir()] == ["release-ray"]  # no temp dirs, contexts or spills left


PLANNED = ["--target", "cpu-avx2,mobile-arm64", "--calib-samples", "4", "--calib-len", "32"]  # planner + quantize


def test_quantize_split_into_ray_tasks_gives_the_inprocess_bytes(cluster, tiny_llama, tmp_path):
    """A planned matrix on the cluster: each quantize step (a segment task) runs its layer's
    linears as Ray tasks of their own (inputs through the object store); byte-identical."""
    code, text = run_cli("build", tiny_llama, *PLANNED, "-o", tmp_path / "in")
    assert code == 0, text
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "edgeq.cli", "build", str(tiny_llama), *PLANNED, "--ray-address",
           f"127.0.0.1:{cluster.port}", "-o", str(out)]
    run = subprocess.run(cmd, env={**cluster.env, "RAY_DEDUP_LOGS": "0"}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, timeout=600)
    text = run.stdout.decode(errors="replace")
    assert run.returncode == 0, text
    for label in ("cpu-avx2-gguf", "mobile-arm64-gguf"):  # (the workers' lines, forwarded: twice, by both nodes)
        assert f"[{label}] quantizing a layer's linears as one task each (Ray tasks)" in text, text
    same_tree(out, tmp_path / "in")
    assert leftovers(tmp_path) == []


def test_a_single_target_build_splits_quantize_over_ray(cluster, tiny_llama, tmp_path):
    args = ["--target", "cpu-avx2", "--calib-samples", "4", "--calib-len", "32"]
    code, text = run_cli("build", tiny_llama, *args, "-o", tmp_path / "in")
    assert code == 0, text
    code, text = run_cli("build", tiny_llama, *args, "--ray-address", f"127.0.0.1:{cluster.port}", "-o", tmp_path / "ray")
    assert code == 0, text
    assert "quantizing a layer's linears as one task each (Ray tasks)" in text, text  # (this process: the driver)
    same_tree(tmp_path / "in", tmp_path / "ray")
    assert leftovers(tmp_path) == []


def test_a_linear_task_lost_with_its_ray_worker_is_retried(cluster, tmp_path):
    """A quantize task whose Ray worker dies (SIGKILL while it unpacks its arguments) is run again
    by Ray (RaySplit's max_retries); the results equal run_linear's in this process."""
    import numpy as np
    import ray
    import split_faults
    from ray import cloudpickle

    from edgeq.pipeline.split import RaySplit
    from edgeq.quant.linear_task import LinearJob, run_linear

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 128))
    cov = x.T @ x / 256
    w1, w2 = (rng.standard_normal((64, 128)).astype(np.float32) for _ in range(2))
    jobs = [LinearJob("a", "Q4_0", "gptq", 0.01, False), LinearJob("b", "Q5_1", "gptq", 0.01, False, rank=8)]
    marker = tmp_path / "marker"
    tasks = [(jobs[0], w1, cov), (split_faults.DiesOnce.of(jobs[1], marker), w2, cov)]
    cloudpickle.register_pickle_by_value(split_faults)  # (the workers cannot import the tests' helpers)
    ray.init(address=f"127.0.0.1:{cluster.port}", logging_level="ERROR", log_to_driver=False)
    try:
        with RaySplit().open() as run:
            got = run(tasks)
    finally:
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(split_faults)
    assert marker.read_text() == "killed"  # a worker did die
    for job, w, r in zip(jobs, (w1, w2), got):
        want = run_linear(job, w, cov)
        assert r.dequant.tobytes() == want.dequant.tobytes() and r.packed.tobytes() == want.packed.tobytes()
    assert got[0].low_rank is None and [x.tobytes() for x in got[1].low_rank] == [x.tobytes() for x in want.low_rank]


def test_calibration_shards_as_ray_tasks_give_the_in_process_bits(cluster, tiny_llama):
    """Calibration's shards (10 samples, shards of 4) as Ray tasks on the two nodes (the layer's
    weights put in the object store once per layer): the statistics of 1 thread, bit for bit."""
    import ray
    from calib_bits import stats_bits

    from edgeq.calibrate import alpaca_token_sequences, calibrate
    from edgeq.frontend import load_model
    from edgeq.pipeline.split import RaySplit

    ir = load_model(tiny_llama)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=10, seq_len=32)
    want = stats_bits(calibrate(ir, seqs, progress=False, workers=1, shard_samples=4))
    ray.init(address=f"127.0.0.1:{cluster.port}", logging_level="ERROR", log_to_driver=False)
    try:
        split = RaySplit()
        assert split.shard_workers() == 2  # (the cluster's CPUs)
        with split.open_shards(2) as runner:
            got = calibrate(ir, seqs, progress=False, runner=runner, shard_samples=4)
    finally:
        ray.shutdown()
    assert stats_bits(got) == want


def test_a_failing_target_on_ray_is_reported_and_the_others_complete(cluster, tiny_llama, tmp_path, monkeypatch):
    """mobile-arm64's TVM cross linker missing on the cluster (EDGEQ_AARCH64_CC, passed on to the
    workers): that target fails alone, in release.json and the exit code, nothing left of it;
    cpu-avx2 completes; the release equals the in-process one with the same linker missing."""
    import edgeq.kernels.compile

    missing = "aarch64-missing-linux-gnu-gcc"
    monkeypatch.setenv("EDGEQ_AARCH64_CC", missing)
    monkeypatch.setattr(edgeq.kernels.compile, "AARCH64_CC", missing)  # (this process: imported already)
    args = ["--target", "cpu-avx2,mobile-arm64", "--format", "tvm", "--bits", "4"]
    code, text = run_cli("build", tiny_llama, *args, "-o", tmp_path / "in")
    assert code == 1, text
    out = tmp_path / "ray"
    code, text = run_cli("build", tiny_llama, *args, "--ray-address", f"127.0.0.1:{cluster.port}", "-o", out)
    assert code == 1, text
    assert f"error: mobile-arm64-tvm: cross-linking for aarch64 needs {missing}" in text
    assert sorted(p.name for p in out.iterdir()) == ["cpu-avx2-tvm", "release.json"]
    idx = json.loads((out / "release.json").read_text())
    assert [(f["dir"], f["step"]) for f in idx["failed"]] == [("mobile-arm64-tvm", "lower")]
    assert [a["dir"] for a in idx["artifacts"]] == ["cpu-avx2-tvm"]
    assert leftovers(tmp_path) == [] and leftovers(out) == []
    same_tree(out, tmp_path / "in")


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def worker_tasks(roots: set[int]) -> list[tuple[int, str]]:
    """(pid, title) of the cluster's worker processes (descendants of the ``ray start`` processes
    ``roots``: workers have process groups of their own) running one of our tasks now."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            title = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not title.startswith(("ray::_ray_segment", "ray::_ray_tail")):
                continue
            pid = int(d.name)
            while pid > 1 and pid not in roots:
                pid = parent(pid)
        except (OSError, ValueError):
            continue
        if pid in roots:
            found.append((int(d.name), title))
    return found


def kill_a_tail_mid_lowering(roots: set[int], where: Path) -> list[int] | None:
    """Freeze (SIGSTOP) every worker running a tail task; if a member artifact's temporary directory
    (``.<label>.tmp-*``, inside the release's own ``.release-ray.tmp-*``, which lives all build
    long) exists under ``where`` then, its lowering is under way in one of them (only tail tasks
    make one, and a finished one has renamed it): SIGKILL them all and return their pids.
    Otherwise let them go on (SIGCONT) and return None. (Killing on the title alone could hit a
    worker whose task had just returned: then nothing is lost and nothing retried.)"""
    stopped: set[int] = set()
    while True:  # (until no tail started between the scan and the stop)
        tails = {pid for pid, title in worker_tasks(roots) if title.startswith("ray::_ray_tail")} - stopped
        if not tails:
            break
        for pid in tails:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.add(pid)
            except ProcessLookupError:
                pass
    if not stopped:
        return None
    lowering = any(p.is_dir() for label in MEMBERS for p in where.rglob(f".{label}.tmp-*"))
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL if lowering else signal.SIGCONT)
        except ProcessLookupError:
            pass
    return sorted(stopped) if lowering else None


def test_a_worker_killed_mid_build_is_retried(cluster, inprocess_release, tiny_llama, tmp_path):
    """SIGKILL the workers running the members' lowerings (tail tasks) while an artifact's temp
    dir exists: the matrix sees the task lost, removes what it left, runs it again; the release is
    still byte-identical."""
    out = tmp_path / "release-ray"
    cmd = [sys.executable, "-m", "edgeq.cli", "build", str(tiny_llama), "--target", TARGETS, *PRUNED,
           "--executor", f"ray://127.0.0.1:{cluster.client_port}", "-o", str(out)]
    env = {**cluster.env, "RAY_DEDUP_LOGS": "0"}
    killed = None
    for _ in range(3):  # (a tiny lowering is ~0.1 s: a loaded machine may let a build slip past)
        build = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            while killed is None and build.poll() is None:
                killed = kill_a_tail_mid_lowering(cluster.pgids(), tmp_path)
                time.sleep(0.01)
            text = build.communicate(timeout=600)[0].decode(errors="replace")
        finally:
            if build.poll() is None:
                build.kill()
        if killed is not None:
            break
        assert build.returncode == 0, text
        shutil.rmtree(out)  # (built with no kill: build it again)
        time.sleep(3.0)  # (let the cluster's client server finish with the last client)
    assert killed is not None, "no tail task was caught mid-lowering in three builds"
    assert build.returncode == 0, text
    assert "lost (" in text and "retrying (attempt 2 of 3)" in text, text
    same_tree(out, inprocess_release)
    assert [p.name for p in tmp_path.iterdir()] == ["release-ray"]


def test_without_ray_installed_the_ray_executor_is_one_error_line(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # (import ray -> ImportError)
    out = tmp_path / "rel"
    code, text = run_cli("build", tiny_llama, "--target", "cpu-avx2,mobile-arm64", "--bits", "4",
                         "--executor", "ray", "-o", out)
    assert code == 1 and len(text.strip().splitlines()) == 1, text
    assert text.startswith("error: --executor ray needs Ray, which is not installed (pip install 'edgeq[ray]')")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--executor", "processes", "--ray-address", "127.0.0.1:1"], "--ray-address applies to --executor ray"),
    (["--executor", "ray://127.0.0.1:1", "--ray-address", "127.0.0.1:2"], "two different clusters"),
    (["--executor", "dask"], "unknown executor 'dask'"),
])
def test_bad_executor_options_are_one_line_errors(args, message, tiny_llama, tmp_path):
    out = tmp_path / "rel"
    code, text = run_cli("build", tiny_llama, "--target", "cpu-avx2,mobile-arm64", "--bits", "4", *args, "-o", out)
    assert code == 1 and text.startswith("error:") and message in text and len(text.strip().splitlines()) == 1, text
    assert not out.exists() and list(tmp_path.iterdir()) == []
