"""Gemma 3 through the ONNX lowering (GeGLU, QK-norm, sandwich norms, scaled embedding, query
scaling, sliding-window and global layers with their RoPE bases) on tiny random checkpoints whose
prompts cross the sliding window: logits against transformers' Gemma3ForCausalLM (the oracle) and
the reference runtime, prefill and decode with the KV cache, in both attention forms; an MLP-pruned
Gemma 3 in one multi-rate graph against the reference runtime at every rate."""
import dataclasses

import numpy as np
import pytest

import onnx
import onnxruntime  # noqa: F401

from edgeq.artifact import write_manifest
from edgeq.backends.onnx import lower as lo
from edgeq.frontend import load_model
from runtimes.onnxrt import OnnxSession
from runtimes.reference import ReferenceSession

FLOAT = dict(linear=None, head=None)
INT4 = dict(linear="int4_g32_sym", head="int8_g32_sym")
ONNX_VS_REFERENCE_MAX_REL = 1e-4  # as tests/backends/onnx/test_lower.py (fp32 activations)
ONNX_F32_VS_TRANSFORMERS_MAX_REL = 1e-5  # as the reference runtime's float32 bound (tests/runtimes)
N_TOKENS = 24  # > 2 x the tiny model's sliding window (8)


def _write(ir, out, **kw):
    out.mkdir(parents=True)
    opts = lo.OnnxOptions(**kw)
    info = lo.write_onnx(ir, out, opts)
    write_manifest(out, {"format": "onnx", "onnx": info, "hparams": ir.hparams.to_json()})
    return opts


def _ids(ir, n=N_TOKENS, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, ir.hparams.vocab_size, n)]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _hf_logits(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


def _decode(s, ids, split=(5, 11)):
    """Logits of every position fed as a prompt, a second chunk, then one token at a time."""
    s.reset()
    a, b = split
    parts = [s._run(ids[:a], True), s._run(ids[a:b], True)] + [s._run([t], True) for t in ids[b:]]
    return np.concatenate(parts)


@pytest.mark.parametrize("attention", ["gqa", "standard"])
@pytest.mark.parametrize("which", ["tiny_gemma3", "tiny_gemma3_scaled"])
def test_float_graph_matches_transformers_prefill_and_decode(which, attention, tmp_path, request):
    model_dir = request.getfixturevalue(which)
    ir = load_model(model_dir)
    assert ir.hparams.sliding_window < N_TOKENS // 2 and ir.hparams.qk_norm and ir.hparams.sandwich_norm
    _write(ir, tmp_path / "a", attention=attention, accuracy_level=1, **FLOAT)
    ids = _ids(ir)
    theirs = _hf_logits(model_dir, ids)
    assert np.abs(theirs).max() > 0.05  # not a degenerate model
    s = OnnxSession(tmp_path / "a")
    assert _rel(s.logits(ids), theirs) <= ONNX_F32_VS_TRANSFORMERS_MAX_REL
    # decode with the cache: prompt, a chunk, then single tokens, all well past the window
    assert _rel(_decode(s, ids), theirs) <= ONNX_F32_VS_TRANSFORMERS_MAX_REL


@pytest.mark.parametrize("attention", ["gqa", "standard"])
@pytest.mark.parametrize("weights", ["float", "int4"])
def test_logits_match_reference_runtime(tiny_gemma3, tmp_path, attention, weights):
    """accuracy_level 1: the graph computes the dequantized model, prefill and decode."""
    ir = load_model(tiny_gemma3)
    opts = _write(ir, tmp_path / "a", attention=attention, accuracy_level=1, **{"float": FLOAT, "int4": INT4}[weights])
    ids = _ids(ir, seed=1)
    want = ReferenceSession(lo.lowered_ir(ir, opts), n_ctx=64, dtype=np.float64).logits(ids)
    s = OnnxSession(tmp_path / "a")
    assert _rel(s.logits(ids), want) <= ONNX_VS_REFERENCE_MAX_REL
    assert _rel(_decode(s, ids, split=(9, 14)), want) <= ONNX_VS_REFERENCE_MAX_REL
    last = s._start(ids[:17])  # generation: the prompt's last position only
    assert _rel(last, want[16]) <= ONNX_VS_REFERENCE_MAX_REL


def test_the_window_is_in_the_graph(tiny_gemma3, tmp_path):
    """Sliding layers' GQA nodes carry the window and the local RoPE base's cache; a graph of the
    same weights without the window (all layers global) is far from the oracle, so the bound
    above checks the window."""
    ir = load_model(tiny_gemma3)
    hp = ir.hparams
    _write(ir, tmp_path / "a", accuracy_level=1, **FLOAT)
    m = onnx.load(str(tmp_path / "a" / lo.MODEL_FILE), load_external_data=False)
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == hp.num_layers
    for i, n in enumerate(gqa):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.get("local_window_size", -1) == (hp.sliding_window if hp.is_sliding(i) else -1)
        assert attrs["scale"] == pytest.approx(hp.attention_scale, rel=1e-7)
    assert len({tuple(n.input[7:9]) for n in gqa}) == 2  # two RoPE bases, two cos/sin caches
    assert sum(n.op_type == "Gelu" for n in m.graph.node) == hp.num_layers
    ids = _ids(ir, seed=2)
    theirs = _hf_logits(tiny_gemma3, ids)
    for change in (dict(layer_types=None), dict(rope_local_theta=None)):
        other = ir.replace(hparams=dataclasses.replace(hp, **change))
        out = tmp_path / f"no{len(list(tmp_path.iterdir()))}"
        _write(other, out, accuracy_level=1, **FLOAT)
        assert _rel(OnnxSession(out).logits(ids), theirs) > 100 * ONNX_F32_VS_TRANSFORMERS_MAX_REL, change


def test_gemma3_lowering_is_deterministic(tiny_gemma3, tmp_path):
    ir = load_model(tiny_gemma3)
    for d in ("a", "b"):
        _write(ir, tmp_path / d, **INT4)
    for f in (lo.MODEL_FILE, lo.DATA_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


@pytest.mark.parametrize("ffn_rates", lo.FFN_RATES)
@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_pruned_graph_matches_reference_at_every_rate(pruned_gemma3_ir, tmp_path, attention, ffn_rates):
    """MLP-pruned Gemma 3 (UniQL sort, --prune-dims mlp, --prune-bias) in one graph with a rate
    input: at rates 0 and 0.25, prefill and decode across the window, the reference runtime on the
    graph's own weights; 0.25 really cuts GeGLU channels and adds its bias rows."""
    ir = pruned_gemma3_ir
    assert ir.prune.rates == (0.0, 0.25) and ir.prune_means
    opts = _write(ir, tmp_path / "a", attention=attention, accuracy_level=1, ffn_rates=ffn_rates, **INT4)
    low = lo.lowered_ir(ir, opts)
    ref = ReferenceSession(low, n_ctx=64, dtype=np.float64)
    plain = ReferenceSession(low.replace(prune_means={}), n_ctx=64, dtype=np.float64)
    s = OnnxSession(tmp_path / "a")
    ids = _ids(ir, seed=3)
    want = {}
    for r in ir.prune.rates:  # switched in place, one session
        for x in (s, ref, plain):
            x.set_prune_rate(r)
        want[r] = ref.logits(ids)
        assert _rel(s.logits(ids), want[r]) <= ONNX_VS_REFERENCE_MAX_REL, r
        assert _rel(_decode(s, ids), want[r]) <= ONNX_VS_REFERENCE_MAX_REL, r
        if r:  # the bias rows are in the graph
            assert _rel(plain.logits(ids), want[r]) > 100 * ONNX_VS_REFERENCE_MAX_REL
    assert _rel(want[0.25], want[0.0]) > 100 * ONNX_VS_REFERENCE_MAX_REL
