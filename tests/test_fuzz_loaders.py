"""A short run of tools/fuzz_loaders.py in the suite (the tool runs >= 10^5 inputs per loader,
docs/robustness.md): every loader either loads a fuzzed input or refuses it with one EdgeqError
line — no other exception, no hang, no allocation driven by a claimed size (tracemalloc)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings

from edgeq.errors import EdgeqError

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fuzz_loaders", REPO / "tools" / "fuzz_loaders.py")
fz = importlib.util.module_from_spec(spec)
sys.modules["fuzz_loaders"] = fz  # dataclasses look their module up
spec.loader.exec_module(fz)

LOADERS = ["safetensors", "gguf", "manifest", "plan", "adapter", "tokenizer", "packed-tokenizer", "goldens"]
EXAMPLES = 60  # per loader: ~1-3 s each here (the suite's budget: ~30 s in all)
PER_INPUT_S = 5.0
# No input may drive the Python heap (numpy included) past this: the seeds are < 600 kB.
PEAK_BYTES = 48 << 20


@pytest.fixture(scope="module")
def loaders(tmp_path_factory, tiny_llama):
    return fz.make_loaders(tmp_path_factory.mktemp("fuzz"), tiny=tiny_llama)


@pytest.mark.parametrize("name", LOADERS)
def test_loader_survives_fuzzing(loaders, name):
    loader = loaders[name]
    assert fz.run_one(loader, loader.seed, PER_INPUT_S) == "accepted", "the seed itself must load"
    # Each input is bounded by PER_INPUT_S (SIGALRM: a hang is a finding). The loop's total time
    # is not asserted here (a speed target: tools/fuzz_loaders.py reports it): the first loader's
    # 60 inputs took 1.8 CPU s alone but 50-93 CPU s inside the full suite on some hosts.
    @settings(max_examples=EXAMPLES, database=None, deadline=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(fz.strategy_for(loader))
    def one(data):
        tracemalloc.reset_peak()
        r = fz.run_one(loader, data, PER_INPUT_S)
        peak = tracemalloc.get_traced_memory()[1]
        if isinstance(r, BaseException):
            raise AssertionError(f"{name}: {type(r).__name__}: {r}") from r
        assert peak < PEAK_BYTES, f"{name}: one input allocated {peak / 2**20:.0f} MiB"

    tracemalloc.start()
    try:
        one()
    finally:
        tracemalloc.stop()


def test_the_harness_reports_other_exceptions_and_hangs(loaders):
    bad = fz.Loader("bad", "binary", b"", lambda data: {}[data])
    assert isinstance(fz.run_one(bad, b"x", 1.0), KeyError)
    slow = fz.Loader("slow", "binary", b"", lambda data: time.sleep(5))
    assert isinstance(fz.run_one(slow, b"x", 0.2), fz.Hang)
    multiline = fz.Loader("ml", "binary", b"", lambda data: (_ for _ in ()).throw(EdgeqError("a\nb")))
    assert isinstance(fz.run_one(multiline, b"x", 1.0), AssertionError)
    fz._alarm(signal.SIGALRM, None)  # a late alarm (none armed: between inputs) is ignored, not raised

    def wraps_everything(data):  # a loader that turns any Exception into a refusal (read_gguf does)
        try:
            if data == b"slow":
                time.sleep(5)
            if data == b"big":
                raise MemoryError("an allocation past the limit")
        except Exception as exc:  # noqa: BLE001
            raise EdgeqError(f"corrupt: {type(exc).__name__}") from None

    wrapping = fz.Loader("wrap", "binary", b"", wraps_everything)
    assert isinstance(fz.run_one(wrapping, b"slow", 0.2), fz.Hang)  # not swallowed as a refusal
    assert isinstance(fz.run_one(wrapping, b"big", 1.0), MemoryError)  # refused, but a finding
    assert fz.run_one(wrapping, b"fine", 1.0) == "accepted"


def _hang_if(cond):
    def run(data):
        if cond(data):
            lock = threading.Lock()
            lock.acquire()
            lock.acquire()  # a real deadlock inside the loader (no signal can break it)
        if data[:1] == b"!":
            raise EdgeqError("refused")
    return run


def test_the_fuzzing_child_is_killed_on_a_hang_and_the_input_saved(tmp_path):
    """The tool's runs happen in a child process watched from the parent: a loader that
    deadlocks on some inputs is killed after the timeout, the input is saved and, hanging again
    alone, reported as a Hang; the other inputs are still counted; no SIGALRM is involved."""
    hangs = lambda data: len(data) % 7 == 3  # noqa: E731
    loader = fz.Loader("deadlock", "binary", b"seed!", _hang_if(hangs))
    t0 = time.monotonic()
    res = fz.fuzz(loader, 40, timeout=0.5, out_dir=tmp_path / "found", seed=3, work=tmp_path)
    assert time.monotonic() - t0 < 60
    assert res.inputs >= 40 and res.accepted + res.refused + sum(c for c, _, _ in res.findings.values()) == res.inputs
    assert list(res.findings) == ["Hang (over 0.5 s)"], (res.findings, res.harness)
    count, path, _ = res.findings["Hang (over 0.5 s)"]
    assert count >= 1 and hangs(Path(path).read_bytes())
    assert not res.harness


def test_a_hang_that_does_not_come_back_is_a_harness_event_not_a_finding(tmp_path):
    marker = tmp_path / "hung-once"

    def once(data):  # hangs the first time only (a load spike, a deadlock outside the loader)
        if not marker.exists():
            marker.write_bytes(data)
            time.sleep(30)

    res = fz.fuzz(fz.Loader("once", "binary", b"abc", once), 10, timeout=0.5, out_dir=tmp_path / "f",
                  seed=1, work=tmp_path)
    assert not res.findings and len(res.harness) == 1 and "alone: accepted" in res.harness[0]
    assert res.inputs >= 10 and res.accepted == res.inputs


def test_crashes_and_allocations_in_the_child_are_findings_with_the_input(tmp_path):
    def crash(data):
        if len(data) % 13 == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a loader crash takes only the child down
        if len(data) % 4 == 2:
            bytearray(8 << 30)  # an allocation past RLIMIT_AS: MemoryError

    res = fz.fuzz(fz.Loader("crash", "binary", b"abcd", crash), 60, timeout=5.0, out_dir=tmp_path / "f",
                  seed=2, mem_mb=512, work=tmp_path)
    sigs = sorted(res.findings)
    assert sigs[0] == "MemoryError at test_fuzz_loaders.py:" + sigs[0].rsplit(":", 1)[1], sigs
    assert sigs[1:] == ["child process died"], (sigs, res.harness)
    assert len(Path(res.findings["child process died"][1]).read_bytes()) % 13 == 1
    assert len(Path(res.findings[sigs[0]][1]).read_bytes()) % 4 == 2
    assert not res.harness


def _peak_of(fn) -> tuple[BaseException | None, int]:
    tracemalloc.start()
    try:
        fn()
        err = None
    except BaseException as exc:  # noqa: BLE001
        err = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return err, peak


def test_safetensors_claiming_a_1e12_element_tensor_is_refused_without_allocating(tmp_path):
    from edgeq.frontend.safetensors_io import read_safetensors

    for shape, offsets in (([10**6, 10**6], [0, 4 * 10**12]),  # consistent claim, data absent
                           ([2**32, 2**32], [0, 16]),  # int64 product overflow must not wrap
                           ([10**6, 10**6], [0, 16])):
        h = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
        f = tmp_path / "big.safetensors"
        f.write_bytes(struct.pack("<Q", len(h)) + h + bytes(16))
        err, peak = _peak_of(lambda: read_safetensors(f))
        assert isinstance(err, EdgeqError), err
        assert peak < 1 << 20, peak


def _patch_gguf_dims(seed: bytes, tensor: bytes, dims: tuple[int, ...]) -> bytes:
    """The GGUF ``seed`` with tensor ``tensor``'s info entry claiming ``dims`` (same rank)."""
    i = seed.rindex(struct.pack("<Q", len(tensor)) + tensor) + 8 + len(tensor)
    (n_dims,) = struct.unpack_from("<I", seed, i)
    assert n_dims == len(dims)
    return seed[:i + 4] + struct.pack(f"<{n_dims}Q", *dims) + seed[i + 4 + 8 * n_dims:]


def test_gguf_claiming_a_1e12_element_tensor_is_refused_without_allocating(loaders, tmp_path):
    from edgeq.backends.gguf.lower import read_gguf

    f = tmp_path / "big.gguf"
    for dims in ((10**6, 10**6), (2**32, 2**32), (2**63, 2)):
        f.write_bytes(_patch_gguf_dims(loaders["gguf"].seed, b"token_embd.weight", dims))
        err, peak = _peak_of(lambda: read_gguf(f))
        assert isinstance(err, EdgeqError), err
        assert peak < 8 << 20, peak


def test_gguf_patch_helper_changes_what_the_reader_sees(loaders, tmp_path):
    """The patch above really reaches the reader: a same-size claim (8x6 for 6x8) loads with the
    other shape (so the refusals above come from the size, not from a broken file)."""
    from edgeq.backends.gguf.lower import read_gguf

    f = tmp_path / "swapped.gguf"
    f.write_bytes(_patch_gguf_dims(loaders["gguf"].seed, b"output.weight", (6, 8)))
    with pytest.raises(EdgeqError):
        read_gguf(f)  # output is (vocab 6, hidden 8): stored as ne = (8, 6); (6, 8) is inconsistent
    f.write_bytes(loaders["gguf"].seed)
    assert read_gguf(f).tensors["output"].shape == (6, 8)
    assert np.isfinite(read_gguf(f).tensors["output"]).all()


def test_first_run_continues_a_stopped_seed_without_repeating(tmp_path, monkeypatch):
    """--first-run K gives the inputs a full run of the same seed gives from its K-th run of
    CHUNK inputs on (so a fuzzing run stopped after K runs can be continued, counts adding up)."""
    monkeypatch.setattr(fz, "CHUNK", 6)
    log = tmp_path / "inputs"

    def record(data):  # runs in the fuzzing child: append to a file the parent reads after
        with open(log, "a") as f:
            f.write(data.hex() + "\n")

    loader = fz.Loader("rec", "binary", b"seed bytes", record)
    fz.fuzz(loader, 18, timeout=5.0, out_dir=None, seed=4, work=tmp_path)
    whole = log.read_text().splitlines()
    log.unlink()
    fz.fuzz(loader, 12, timeout=5.0, out_dir=None, seed=4, work=tmp_path, first_run=1)
    assert len(whole) == 18 and log.read_text().splitlines() == whole[6:]
