"""A short run of tools/fuzz_loaders.py in the suite (the tool runs >= 10^5 inputs per loader,
docs/robustness.md): every loader either loads a fuzzed input or refuses it with one EdgeqError
line — no other exception, no hang, no allocation driven by a claimed size (tracemalloc)."""
from __future__ import annotations

import importlib.util
import json
import struct
import sys
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

LOADERS = ["safetensors", "gguf", "manifest", "plan", "adapter", "tokenizer", "goldens"]
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
    t0 = time.monotonic()

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
    assert time.monotonic() - t0 < 60  # no hang (each input is also bounded by PER_INPUT_S)


def test_the_harness_reports_other_exceptions_and_hangs(loaders):
    bad = fz.Loader("bad", "binary", b"", lambda data: {}[data])
    assert isinstance(fz.run_one(bad, b"x", 1.0), KeyError)
    slow = fz.Loader("slow", "binary", b"", lambda data: time.sleep(5))
    assert isinstance(fz.run_one(slow, b"x", 0.2), fz.Hang)
    multiline = fz.Loader("ml", "binary", b"", lambda data: (_ for _ in ()).throw(EdgeqError("a\nb")))
    assert isinstance(fz.run_one(multiline, b"x", 1.0), AssertionError)


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
