"""The storage-type registry (edgeq.quant.storage): one entry per type, read by targets, the
planner, the backends' option checks and the GGUF writer."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeq import backends
from edgeq.errors import EdgeqError
from edgeq.quant import storage
from edgeq.quant.codecs import codec_for
from edgeq.quant.formats import FORMATS, QType
from edgeq.quant.intgroup import IntGroupCodec, parse_int_format, storage_codec
from edgeq.quant.reference import quantize
from edgeq.quant.storage import StorageType


def test_ggml_sizes_and_ids_match_gguf_py():
    """Block sizes, bytes per block and type ids are ggml's (gguf-py is the oracle)."""
    gguf = pytest.importorskip("gguf")
    for t in storage.ggml_types():
        qt = gguf.GGMLQuantizationType[t.name]
        assert t.ggml_type_id == int(qt)
        assert (t.block_size, t.type_size) == gguf.GGML_QUANT_SIZES[qt]


def test_formats_is_the_ggml_view_of_the_registry():
    assert [q.value for q in QType] == [t.name for t in storage.ggml_types()]
    for t in storage.ggml_types():
        info = FORMATS[QType(t.name)]
        assert (info.block_size, info.type_size, info.ggml_type_id, info.bits) == \
            (t.block_size, t.type_size, t.ggml_type_id, t.bits)
        assert info.bits_per_weight == t.bits_per_weight()
    assert storage.get("Q4_0").bits_per_weight() == 4.5 and storage.get("Q6_K").bits_per_weight() == 6.5625


def test_registering_twice_is_an_error():
    with pytest.raises(EdgeqError, match="'Q4_0' is registered twice"):
        storage.register(storage.get("Q4_0"))
    clash = dataclasses.replace(storage.get("Q4_0"), name="Q4_X")
    with pytest.raises(EdgeqError, match="GGML type id 2 is already 'Q4_0'"):
        storage.register(clash)
    assert storage.find("Q4_X") is None


def test_register_and_unregister_a_type():
    t = StorageType("T3", 3, 32, 14, frozenset({"gguf"}), "medium", "ggml")
    storage.register(t)
    try:
        assert storage.get("t3") is t and "T3" in storage.names()
    finally:
        storage.unregister("T3")
    assert storage.find("T3") is None


@pytest.mark.parametrize("kw, message", [
    ({"speed": "quick"}, "speed class"),
    ({"codec": "magic"}, "codec must be one of"),
    ({"backends": frozenset()}, "backends must be a non-empty subset"),
    ({"backends": frozenset({"tflite"})}, "backends must be a non-empty subset"),
    ({"type_size": None}, "give block_size and type_size together"),
])
def test_entries_are_validated(kw, message):
    base = dict(name="X", bits=4, block_size=32, type_size=18, backends=frozenset({"gguf"}), speed="fast",
                codec="ggml")
    with pytest.raises(EdgeqError, match=message):
        StorageType(**{**base, **kw})


def test_every_entry_names_registered_backends_and_a_speed_class():
    for t in storage.types():
        assert t.backends <= set(backends.names())
        assert t.speed in storage.SPEED_CLASSES


def test_bits_per_backend():
    """What --bits means per backend (was: build.py, targets.py, gguf _BITS and each backend)."""
    assert storage.bits_choices() == (4, 8, 16, 32)
    assert storage.bits_choices("gguf") == (4, 8, 16, 32)
    assert storage.bits_choices("onnx") == (4, 8, 32)
    assert storage.bits_choices("tvm") == (4, 8)
    assert storage.bits_choices("reference") == (32,)
    assert [storage.for_bits("gguf", b).name for b in (4, 8, 16, 32)] == ["Q4_0", "Q8_0", "F16", "F32"]
    assert [storage.for_bits("onnx", b).name for b in (4, 8, 32)] == ["INT4", "INT8", "F32"]
    with pytest.raises(EdgeqError, match="the tvm format takes --bits 4 or 8, got 32"):
        storage.for_bits("tvm", 32)


def test_int_groups_take_the_targets_block():
    int4 = storage.get("INT4")
    assert int4.block_size is None and int4.block_for(128) == 128
    with pytest.raises(EdgeqError, match="quant_block_size"):
        int4.block_for()
    assert int4.codec_name(32) == "int4_g32_sym" and storage.get("INT8").codec_name(128) == "int8_g128_sym"
    c = storage_codec("INT4", 64)
    assert isinstance(c, IntGroupCodec) and c.fmt == parse_int_format("int4_g64_sym")
    assert int4.block_bytes(64) == c.type_size and int4.bits_per_weight(32) == 4.5
    assert int4.nbytes((3, 128), 64) == 3 * 2 * c.type_size


def test_ggml_codec_and_sizes_agree_with_the_writer():
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    for t in storage.ggml_types():
        if t.quantized:
            assert storage_codec(t.name) is codec_for(t.name)
            assert storage_codec(t.name).type_size == t.type_size
        assert quantize(x, t.name).nbytes == t.nbytes(x.shape)


def test_check_storable_and_plannable():
    assert storage.check_storable(["Q4_0", "F16"], "gguf") == ("Q4_0", "F16")
    with pytest.raises(EdgeqError, match="INT4 cannot be stored in a gguf artifact"):
        storage.check_storable(["Q4_0", "INT4"], "gguf")
    with pytest.raises(EdgeqError, match="Q4_0 cannot be stored in a onnx artifact"):
        storage.check_storable(["Q4_0"], "onnx")
    with pytest.raises(EdgeqError, match="unknown storage type 'Q2_K'"):
        storage.check_storable(["Q2_K"], "gguf")
    with pytest.raises(EdgeqError, match="INT4 cannot be planned"):
        storage.plannable(["INT4"], "onnx")
