"""ONNX lowering: graph checks, logits vs the reference runtime, KV cache, sorted RoPE, determinism."""
import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edgeq.artifact import write_manifest  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.frontend import load_model  # noqa: E402
from edgeq.ir import Role  # noqa: E402
from edgeq.lower import onnx as lo  # noqa: E402
from runtimes.onnxrt import OnnxSession  # noqa: E402
from runtimes.reference import ReferenceSession  # noqa: E402

FLOAT = dict(linear=None, head=None)
INT4 = dict(linear="int4_g32_sym", head="int8_g32_sym")
INT8 = dict(linear="int8_g32_sym", head="int8_g32_sym")


def _write(ir, out, **kw):
    out.mkdir(parents=True)
    opts = lo.OnnxOptions(**kw)
    info = lo.write_onnx(ir, out, opts)
    write_manifest(out, {"format": "onnx", "onnx": info, "hparams": ir.hparams.to_json()})
    return opts


def _ids(ir, n=24, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, ir.hparams.vocab_size, n)]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _mean_kl(ref_logits, logits):
    p, q = _log_softmax(ref_logits.astype(np.float64)), _log_softmax(logits.astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("attention", ["gqa", "standard"])
@pytest.mark.parametrize("weights", ["float", "int4", "int8"])
def test_logits_match_reference_runtime(tiny_model, tmp_path, attention, weights):
    """accuracy_level 1 (fp32 activations): the graph computes exactly the dequantized model."""
    ir = load_model(tiny_model)
    kw = {"float": FLOAT, "int4": INT4, "int8": INT8}[weights]
    opts = _write(ir, tmp_path / "a", attention=attention, accuracy_level=1, **kw)
    ids = _ids(ir)
    got = OnnxSession(tmp_path / "a").logits(ids)
    want = ReferenceSession(lo.lowered_ir(ir, opts), dtype=np.float64).logits(ids)
    assert got.shape == (len(ids), ir.hparams.vocab_size)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    if weights != "float":  # and the dequantized model really is quantized
        assert not np.allclose(lo.lowered_ir(ir, opts).linear(0, Role.Q).weight, ir.linear(0, Role.Q).weight)


def test_int8_activation_path_stays_close(tiny_model, tmp_path):
    """accuracy_level 4 quantizes activations to int8 inside MatMulNBits: close, not exact."""
    ir = load_model(tiny_model)
    opts = _write(ir, tmp_path / "a", accuracy_level=4, **INT8)
    ids = _ids(ir)
    got = OnnxSession(tmp_path / "a").logits(ids)
    want = ReferenceSession(lo.lowered_ir(ir, opts), dtype=np.float64).logits(ids)
    assert _mean_kl(want, got) < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_kv_cache_decode_equals_full_recompute(tiny_model, tmp_path, attention):
    ir = load_model(tiny_model)
    _write(ir, tmp_path / "a", attention=attention, **INT4)
    s = OnnxSession(tmp_path / "a")
    ids = _ids(ir, 20)
    full = s.logits(ids)
    s.reset()
    parts = [s._run(ids[:9], True), s._run(ids[9:14], True)] + [s._run([t], True) for t in ids[14:]]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=1e-4 * np.abs(full).max())
    # generation: prompt logits at the last position only, then one token at a time
    last = s._start(ids[:9])
    np.testing.assert_allclose(last, full[8], rtol=0, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_sorted_rope_pairs_are_lowered_exactly(tiny_llama, tmp_path, attention):
    """A Q/K pair sort (rope_index): gathered frequencies (standard) or the sort undone (gqa)."""
    from edgeq.passes.naive_sort import naive_sort

    ir = naive_sort(load_model(tiny_llama))
    assert ir.rope_index and any(not np.array_equal(v[0], np.arange(v.shape[1])) for v in ir.rope_index.values())
    _write(ir, tmp_path / "a", attention=attention, accuracy_level=1, **FLOAT)
    ids = _ids(ir)
    want = ReferenceSession(ir, dtype=np.float64).logits(ids)
    got = OnnxSession(tmp_path / "a").logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_graph_structure(tiny_llama, tmp_path):
    ir = load_model(tiny_llama)
    _write(ir, tmp_path / "a", **INT4)
    path = tmp_path / "a" / lo.MODEL_FILE
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path), load_external_data=False)
    assert {o.domain or "": o.version for o in m.opset_import}[""] >= 17
    nodes = list(m.graph.node)
    mnb = [n for n in nodes if n.op_type == "MatMulNBits"]
    L = ir.hparams.num_layers
    assert len(mnb) == 7 * L + 1  # block linears + the head (tied or not)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mnb[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
    assert sum(n.op_type == "GroupQueryAttention" for n in nodes) == L
    names = [i.name for i in m.graph.input]
    assert names[:2] == ["input_ids", "logits_from"] and f"past.{L - 1}.value" in names
    assert [o.name for o in m.graph.output][0] == "present.0.key" and "logits" in [o.name for o in m.graph.output]
    # weights live in one external file, large tensors page aligned
    locs = set()
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            d = {e.key: e.value for e in t.external_data}
            locs.add(d["location"])
            if int(d["length"]) >= 65536:
                assert int(d["offset"]) % 4096 == 0
    assert locs == {lo.DATA_FILE}


def test_tied_embedding_is_one_initializer(tiny_qwen2, tmp_path):
    ir = load_model(tiny_qwen2)
    assert ir.hparams.tie_word_embeddings
    _write(ir, tmp_path / "a", **INT4)
    m = onnx.load(str(tmp_path / "a" / lo.MODEL_FILE), load_external_data=False)
    users = [n.op_type for n in m.graph.node if "token_embd.qweight" in n.input]
    assert sorted(users) == ["Gather", "MatMulNBits"]
    assert sum("token_embd" in t.name and t.name.endswith("qweight") for t in m.graph.initializer) == 1


def test_lowering_is_deterministic(tiny_qwen2, tmp_path):
    ir = load_model(tiny_qwen2)
    for d in ("a", "b"):
        _write(ir, tmp_path / d, **INT4)
    for f in (lo.MODEL_FILE, lo.DATA_FILE, lo.TOKENIZER_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_group_falls_back_to_a_divisor_of_the_width():
    assert lo.fit_format("int4_g128_sym", 576).group == 64
    assert lo.fit_format("int4_g128_sym", 1536).group == 128
    assert lo.fit_format("int8_g32_asym", 96).name == "int8_g32_asym"
    with pytest.raises(EdgeqError, match="divides"):
        lo.fit_format("int4_g32_sym", 40)


def test_refuses_what_it_cannot_express(tiny_llama, tmp_path):
    ir = load_model(tiny_llama)
    with pytest.raises(EdgeqError, match="8-bit or float32"):
        lo.build_model(ir, lo.OnnxOptions(linear="int4_g32_sym", head="int4_g32_sym"))
    with pytest.raises(EdgeqError, match="attention"):
        lo.OnnxOptions(attention="flash")


def test_tokenizer_spec_round_trip(tiny_llama, tmp_path):
    ir = load_model(tiny_llama)
    lo.write_tokenizer(ir.tokenizer, tmp_path / "t.json")
    assert lo.read_tokenizer(tmp_path / "t.json") == ir.tokenizer
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(EdgeqError, match="tokenizer"):
        lo.read_tokenizer(tmp_path / "bad.json")
