"""Lazy GGUF input (edgeq.backends.gguf.lazy.GGUFTensor via read_gguf): every ggml type decodes
bit-identically to the eager reader it replaced (whole tensors, row slices at any boundary, the
Q/K head permutation), nothing is dequantized at open, and bad types are refused at open."""
from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgeq.backends.gguf.layout import interleaved_to_rotate_half, needs_permute
from edgeq.backends.gguf.lazy import GGUFTensor, can_dequantize
from edgeq.backends.gguf.lower import read_gguf, tensor_types, write_gguf
from edgeq.errors import EdgeqError
from edgeq.ir import Arch, Role
from edgeq.lazy import LazyTensor, is_lazy, materialize
from edgeq.quant.formats import QType
from edgeq.quant.reference import dequantize
from edgeq_tests_gguf_tiny import tiny_ir

REPO = Path(__file__).resolve().parents[3]


def eager_dequant(t) -> np.ndarray:
    """The reader's eager decoding before it became lazy (verbatim): the oracle for bit identity."""
    shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
    tt = t.tensor_type
    name = tt.name
    if name == "F32":
        return np.array(t.data, dtype=np.float32).reshape(shape)
    if name in QType.__members__:
        return np.asarray(dequantize(np.asarray(t.data), QType(name), shape), dtype=np.float32)
    out = gguf.quants.dequantize(np.asarray(t.data), tt)
    return np.asarray(out, dtype=np.float32).reshape(shape)


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


DECODABLE = [t.name for t in gguf.GGMLQuantizationType if can_dequantize(t.name)]
ROWS, COLS = 12, 512  # 512: whole blocks of every type (block sizes up to 256)
SLICES = [(0, 12), (0, 1), (11, 12), (3, 4), (1, 11), (5, 9), (4, 8), (7, 12), (0, 0), (6, 6), (-3, 40)]


def test_decodable_types_cover_edgeq_and_gguf_py():
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
            "Q6_K", "IQ4_NL", "IQ4_XS"} <= set(DECODABLE)
    assert not {"I8", "I16", "I32", "I64", "F64"} & set(DECODABLE)


@pytest.fixture(scope="module")
def all_types_file(tmp_path_factory):
    """One GGUF with a (12, 512) tensor of random bytes per decodable type (NaN/inf scales
    included: identity is checked on the bits)."""
    path = tmp_path_factory.mktemp("types") / "types.gguf"
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), "llama")
    for name in DECODABLE:
        qt = gguf.GGMLQuantizationType[name]
        n, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (ROWS, COLS // n * size), dtype=np.uint8)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random scales: NaN * 0
@pytest.mark.parametrize("name", DECODABLE)
def test_every_type_decodes_like_the_eager_reader(all_types_file, name):
    t = {x.name: x for x in gguf.GGUFReader(str(all_types_file)).tensors}[name]
    want = eager_dequant(t)
    lazy = GGUFTensor(all_types_file, t.data_offset, name, want.shape)
    assert isinstance(lazy, LazyTensor) and is_lazy(lazy) and lazy.shape == (ROWS, COLS)
    assert lazy.stored_nbytes == t.n_bytes
    assert same_bits(lazy.numpy(), want) and same_bits(np.asarray(lazy), want) and same_bits(materialize(lazy), want)
    for a, b in SLICES:
        assert same_bits(lazy[a:b], want[a:b]), (a, b)
        assert same_bits(lazy.rows(a, b), want[max(a, 0):min(b, ROWS)] if a < b else want[:0]), (a, b)
    # the Q/K permutation: 3 heads of 4 rows, 2 heads of 6, 6 of 2; any row range
    for heads in (3, 2, 6):
        permuted = GGUFTensor(all_types_file, t.data_offset, name, want.shape, n_head=heads)
        pw = interleaved_to_rotate_half(want, heads)
        assert same_bits(permuted.numpy(), pw), heads
        for a, b in SLICES:
            assert same_bits(permuted[a:b], pw[a:b]), (heads, a, b)


# ---- whole models: read_gguf's lazy IR vs the eager reader -----------------------------------

def eager_model(path) -> dict[str, np.ndarray]:
    """Every tensor of the GGUF decoded eagerly, Q/K rows permuted as the eager reader did."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        out[t.name] = eager_dequant(t)
    return out


@pytest.mark.parametrize("qtype", [q.value for q in QType])
@pytest.mark.parametrize("arch", [Arch.LLAMA, Arch.QWEN2])
def test_model_reads_lazily_and_equals_the_eager_reader(tmp_path, arch, qtype):
    ir = tiny_ir(arch, tied=False, hidden=256, heads=4, kv=2, ffn=512)
    path = write_gguf(ir, tmp_path / "m.gguf", tensor_types(ir, qtype))
    eager = eager_model(path)
    back = read_gguf(path)
    hp = back.hparams
    for name, lin in back.linears.items():
        assert is_lazy(lin.weight) and isinstance(lin.weight, GGUFTensor), name
        want = eager[f"{name}.weight"]
        if needs_permute(arch, lin.role):
            heads = hp.num_heads if lin.role is Role.Q else hp.num_kv_heads
            assert lin.weight.n_head == heads
            want = interleaved_to_rotate_half(want, heads)
        else:
            assert lin.weight.n_head == 0
        assert same_bits(lin.weight, want), name
        n = want.shape[0]
        for a, b in ((0, 1), (1, n - 1), (n // 3, n // 2 + 5), (31, 97), (n - 1, n), (0, n)):
            assert same_bits(lin.weight[a:b], want[a:b]), (name, a, b)
        if lin.bias is not None:
            bias = eager[f"{name}.bias"]
            if needs_permute(arch, lin.role):
                bias = interleaved_to_rotate_half(bias, lin.weight.n_head)
            assert not is_lazy(lin.bias) and same_bits(lin.bias, bias)
    assert is_lazy(back.tensors["token_embd"]) and is_lazy(back.tensors["output"])
    assert same_bits(back.tensors["token_embd"], eager["token_embd.weight"])
    assert same_bits(back.tensors["output"][100:250], eager["output.weight"][100:250])
    assert not is_lazy(back.tensors["output_norm"])  # 1-D tensors are read at open
    assert same_bits(back.tensors["output_norm"], eager["output_norm.weight"])
    if arch is Arch.LLAMA:  # the permutation really happens (a no-op would not tell the orders apart)
        q = back.linears["blk.0.attn_q"]
        assert not np.array_equal(np.asarray(q.weight), eager["blk.0.attn_q.weight"])


def test_lazy_model_runs_like_its_float_weights(tmp_path):
    """The reference runtime accepts the lazy IR and computes what the materialised IR computes."""
    from edgeq_tests_gguf_tiny import reference_logits

    ir = tiny_ir(Arch.LLAMA, tied=True)
    back = read_gguf(write_gguf(ir, tmp_path / "m.gguf", tensor_types(ir, "Q8_0")))
    dense = back.replace(linears={k: dataclasses.replace(l, weight=np.asarray(l.weight))
                                  for k, l in back.linears.items()},
                         tensors={k: np.asarray(v) for k, v in back.tensors.items()})
    assert not any(is_lazy(l.weight) for l in dense.linears.values())
    np.testing.assert_array_equal(reference_logits(back), reference_logits(dense))


# ---- nothing dequantized at open ---------------------------------------------------------------

_OPEN_PEAK = textwrap.dedent("""
    import json, sys, tracemalloc
    import numpy as np
    from edgeq.backends.gguf.lower import read_gguf
    tracemalloc.start()
    ir = read_gguf(sys.argv[1])
    open_peak = tracemalloc.get_traced_memory()[1]
    f32 = sum(l.weight.nbytes for l in ir.linears.values()) + sum(t.nbytes for t in ir.tensors.values())
    tracemalloc.reset_peak()
    emb = np.asarray(ir.tensors["token_embd"])
    one_peak = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"open_peak": open_peak, "f32": f32, "one_peak": one_peak, "one": emb.nbytes}))
""")


def test_opening_a_gguf_dequantizes_nothing(tmp_path):
    ir = tiny_ir(Arch.LLAMA, tied=False, hidden=1024, heads=8, kv=4, ffn=2048, layers=4, vocab=1024)
    path = write_gguf(ir, tmp_path / "m.gguf", tensor_types(ir, "Q8_0"))
    del ir
    r = subprocess.run([sys.executable, "-c", _OPEN_PEAK, str(path)], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["f32"] > 150e6  # ~157 MB of float32 weights in a ~42 MB Q8_0 file
    # opening allocates no weights: what it does allocate (~11 MB: gguf-py's metadata fields, the
    # file hash's read buffer, the tokenizer, the norms) does not grow with the weights
    assert m["open_peak"] < m["f32"] / 8, m
    assert m["one_peak"] >= m["one"]  # the measurement sees numpy: materialising one tensor shows


# ---- bad types are refused at open ---------------------------------------------------------------

def _patch_type(data: bytes, tensor: bytes, ggml_type: int) -> bytes:
    """The GGUF ``data`` with tensor ``tensor``'s info entry claiming ggml type ``ggml_type``."""
    i = data.rindex(struct.pack("<Q", len(tensor)) + tensor) + 8 + len(tensor)
    (n_dims,) = struct.unpack_from("<I", data, i)
    j = i + 4 + 8 * n_dims
    return data[:j] + struct.pack("<I", ggml_type) + data[j + 4:]


@pytest.mark.parametrize("bad", ["I32", "I8"])
def test_an_undecodable_type_is_refused_at_open(tmp_path, bad):
    ir = tiny_ir(Arch.LLAMA, tied=False)
    good = write_gguf(ir, tmp_path / "m.gguf", tensor_types(ir, 32)).read_bytes()
    f = tmp_path / "bad.gguf"
    f.write_bytes(_patch_type(good, b"blk.1.ffn_up.weight", int(gguf.GGMLQuantizationType[bad])))
    with pytest.raises(EdgeqError) as exc:
        read_gguf(f)
    assert "\n" not in str(exc.value)
    assert "blk.1.ffn_up.weight" in str(exc.value) and bad in str(exc.value)
    f.write_bytes(_patch_type(good, b"blk.1.ffn_up.weight", int(gguf.GGMLQuantizationType.F32)))
    assert is_lazy(read_gguf(f).linears["blk.1.ffn_up"].weight)  # the patch alone breaks nothing
