"""edgeq.backends.gguf.read: GGUF -> ModelIR round trips, the reconstructed tokenizer, corrupt input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gguf

from edgeq.errors import EdgeqError
from edgeq.ir import Arch, Role
from edgeq.backends.gguf.lower import read_gguf, tensor_types, write_gguf, write_lora_gguf
from edgeq.quant import roundtrip
# registered by conftest.py (the tests are not a package)
from edgeq_tests_gguf_tiny import ARCH_TIED, add_lora, tiny_ir


@pytest.mark.parametrize("arch,tied", ARCH_TIED)
def test_roundtrip_f32_exact(tmp_path, arch, tied):
    ir = tiny_ir(arch, tied=tied)
    back = read_gguf(write_gguf(ir, tmp_path / "m.gguf", tensor_types(ir, 32)))
    assert back.hparams == ir.hparams
    assert set(back.linears) == set(ir.linears) and set(back.tensors) == set(ir.tensors)
    for k, l in ir.linears.items():
        assert np.array_equal(back.linears[k].weight, l.weight), k
        assert (l.bias is None) == (back.linears[k].bias is None)
        if l.bias is not None:
            assert np.array_equal(back.linears[k].bias, l.bias)
    for k, v in ir.tensors.items():
        assert np.array_equal(back.tensors[k], v), k
    assert dataclasses.replace(back.tokenizer, tokenizer_json="") == dataclasses.replace(ir.tokenizer, tokenizer_json="")
    back.validate()
    from edgeq.frontend import load_model  # the front end dispatches .gguf files here

    assert load_model(tmp_path / "m.gguf").hparams == ir.hparams


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_roundtrip_quantized_gives_dequantized_values(tmp_path, qtype):
    ir = tiny_ir(Arch.LLAMA, tied=False)
    plan = tensor_types(ir, qtype)
    back = read_gguf(write_gguf(ir, tmp_path / "m.gguf", plan))
    for k, l in ir.linears.items():
        assert np.array_equal(back.linears[k].weight, roundtrip(l.weight, plan[k])), k
    assert np.array_equal(back.tensors["output"], roundtrip(ir.tensors["output"], plan["output"]))
    assert np.array_equal(back.tensors["output_norm"], ir.tensors["output_norm"])


def test_reconstructed_tokenizer_json_encodes_the_same(tmp_path):
    import tokenizers
    ir = tiny_ir()
    back = read_gguf(write_gguf(ir, tmp_path / "m.gguf", tensor_types(ir, 32)))
    a = tokenizers.Tokenizer.from_str(ir.tokenizer.tokenizer_json)
    b = tokenizers.Tokenizer.from_str(back.tokenizer.tokenizer_json)
    for text in ["the other thing", "  spaces  and\ttabs\n", "Café 123 <|im_start|>x<|im_end|>"]:
        assert a.encode(text).ids == b.encode(text).ids
        assert a.decode(a.encode(text).ids) == b.decode(b.encode(text).ids)

@pytest.mark.parametrize("cut", [3, 10, 2000, 0.5, -100])
def test_truncated_gguf_is_a_clear_error(tmp_path, cut):
    data = write_gguf(tiny_ir(tied=False), tmp_path / "m.gguf", tensor_types(tiny_ir(tied=False), 32)).read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut > 0 else len(data) + cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(EdgeqError) as exc:
        read_gguf(bad)
    assert "\n" not in str(exc.value) and "bad.gguf" in str(exc.value)


def test_unknown_architecture_and_adapter_are_clear_errors(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EdgeqError, match="unsupported GGUF architecture 'bert'"):
        read_gguf(tmp_path / "bert.gguf")
    lora = add_lora(tiny_ir(), "x", 0, roles=(Role.Q,))
    with pytest.raises(EdgeqError, match="LoRA adapter"):
        read_gguf(write_lora_gguf(lora, "x", tmp_path / "a.gguf"))
    with pytest.raises(EdgeqError, match="no such file"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("count", [64, 2**20])  # the file has 21 tensors
def test_block_count_beyond_the_tensors_is_refused_fast(tmp_path, count):
    """Found while investigating a fuzzer hang: a block_count field overwritten with a large value
    (a boundary integer, as tools/fuzz_loaders.py writes) made the reader list every layer's
    tensor names before looking for one (2**24: minutes and gigabytes;
    2**32 - 1: unbounded). A count the file's tensors cannot hold is refused before that."""
    import struct
    import time
    import tracemalloc

    ir = tiny_ir(tied=False)
    data = bytearray(write_gguf(ir, tmp_path / "m.gguf", tensor_types(ir, 32)).read_bytes())
    key = b"llama.block_count"
    i = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<II", data, i) == (gguf.GGUFValueType.UINT32, ir.hparams.num_layers)
    struct.pack_into("<I", data, i + 4, count)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(EdgeqError, match=r"block_count -?\d+ with \d+ tensors") as exc:
            read_gguf(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 5 and peak < 8 << 20, (time.monotonic() - t0, peak)
    assert "\n" not in str(exc.value) and "bad.gguf" in str(exc.value)


@pytest.mark.parametrize("edit", ["token_type_length", "tokens_as_int8"])
def test_metadata_array_claiming_more_than_the_file_is_refused_fast(tmp_path, edit):
    """Found by tools/fuzz_loaders.py (seed 18, run 0): gguf-py walks an array element by
    element and reads past the end of the file as empty arrays, so `tokenizer.ggml.tokens`
    re-typed as an int8 array of 2**32 + 1 elements (a 5 kB file) looped 2**32 times. Here
    2**20 elements (seconds of looping before the fix) are refused before gguf-py runs."""
    import struct
    import time

    ir = tiny_ir(tied=False)
    data = bytearray(write_gguf(ir, tmp_path / "m.gguf", tensor_types(ir, 32)).read_bytes())
    key = b"tokenizer.ggml.token_type" if edit == "token_type_length" else b"tokenizer.ggml.tokens"
    i = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    vtype, itype, n = struct.unpack_from("<IIQ", data, i)
    assert vtype == gguf.GGUFValueType.ARRAY and n == ir.hparams.vocab_size
    if edit == "tokens_as_int8":
        assert itype == gguf.GGUFValueType.STRING
        itype = gguf.GGUFValueType.INT8
    struct.pack_into("<IQ", data, i + 4, itype, 2**20)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    t0 = time.monotonic()
    with pytest.raises(EdgeqError, match=r"'tokenizer\.ggml\.token.*': an array of 1048576 values") as exc:
        read_gguf(bad)
    assert time.monotonic() - t0 < 2
    assert "\n" not in str(exc.value) and "bad.gguf" in str(exc.value)
