"""GGUF with bias compensation: each rate's file carries its rate's vector as ``ffn_down.bias``
(llama.cpp's llama and deci architectures load it); llama.cpp running the file equals the
reference runtime at that rate, and differs from the uncompensated model."""
from __future__ import annotations

import numpy as np
import pytest

import gguf
import llama_cpp  # noqa: F401

from edgeq.backends.gguf.rates import (  # noqa: E402
    gguf_prune_spec,
    reference_ir_for_gguf_rate,
    with_rate_bias,
    write_gguf_at_rate,
    write_gguf_rates,
)
from edgeq.ir import LayerWidths, PruneSpec, Role  # noqa: E402
from edgeq.passes.prune_bias import rate_bias  # noqa: E402
from edgeq_tests_prune_bias import RATES, biased_ir, ids_for  # noqa: E402

# F32 weights + F32 KV cache: llama.cpp and the numpy reference differ only by float rounding
F32_MAX_ABS_DIFF = 1e-3


def _llamacpp(path, ids):
    from runtimes.llamacpp import LlamaCppSession

    with LlamaCppSession(path, n_ctx=64, kv_cache_type="f32") as s:
        return s.logits(ids), s.metadata()


def _reference(ir, rate, ids):
    from runtimes.reference import ReferenceSession

    s = ReferenceSession(ir, n_ctx=64)
    s.set_prune_rate(rate)
    return s.logits(ids)


def _bias_tensors(path):
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors if t.name.endswith(".bias")}


def test_f32_rate_files_with_bias_match_the_reference(tiny_model, tmp_path):
    ir = biased_ir(tiny_model)
    files = write_gguf_rates(ir, tmp_path, 32)
    ids = ids_for(ir)
    spec = gguf_prune_spec(ir)
    for r, fname in files.items():
        got, md = _llamacpp(tmp_path / fname, ids)
        one = reference_ir_for_gguf_rate(ir, r)
        want, without = _reference(one, r, ids), _reference(one.replace(prune_means={}), r, ids)
        assert np.abs(got - want).max() < F32_MAX_ABS_DIFF, r
        biases = _bias_tensors(tmp_path / fname)
        for li, w in enumerate(spec.at(r)):
            _, b_d = rate_bias(ir, li, w)
            name = f"blk.{li}.ffn_down.bias"
            if b_d.any():
                assert np.array_equal(biases[name], b_d), (r, li)  # (no ffn_down bias of its own)
            else:
                assert name not in biases
        if r > 0:  # (llama when every layer has one MLP width, else deci: both load the bias)
            assert np.abs(got - without).max() > 10 * F32_MAX_ABS_DIFF, r  # llama.cpp really adds it


def test_llama_architecture_loads_the_bias_too(tiny_llama, tmp_path):
    """One MLP width for every layer: the file keeps the model's own 'llama' architecture, whose
    graph adds the optional ffn_down.bias as well."""
    ir = biased_ir(tiny_llama)
    hp = ir.hparams
    full = LayerWidths(ffn=hp.intermediate_size, qk_pairs=hp.head_dim // 2, v_dims=hp.head_dim)
    flat = LayerWidths(ffn=64, qk_pairs=hp.head_dim // 2, v_dims=hp.head_dim)
    ir = ir.replace(prune=PruneSpec(rates=(0.0, 0.5), granularity=32, widths={
        0.0: (full,) * hp.num_layers, 0.5: (flat,) * hp.num_layers}, dims="mlp"))
    path = write_gguf_at_rate(ir, 0.5, tmp_path / "m.gguf", 32)
    ids = ids_for(ir)
    got, md = _llamacpp(path, ids)
    assert md["general.architecture"] == "llama"
    assert "blk.0.ffn_down.bias" in _bias_tensors(path)
    want = _reference(reference_ir_for_gguf_rate(ir, 0.5), 0.5, ids)
    assert np.abs(got - want).max() < F32_MAX_ABS_DIFF


def test_with_rate_bias_folds_into_existing_biases(tiny_qwen2):
    """Qwen2's attn_output carries the folded V bias: a rate that truncates V/O adds to it."""
    ir = biased_ir(tiny_qwen2)
    w = ir.prune.at(0.5)
    folded = with_rate_bias(ir, w)
    assert not folded.prune_means
    for li in range(ir.hparams.num_layers):
        b_o, b_d = rate_bias(ir, li, w[li])
        o, d = ir.linear(li, Role.O), ir.linear(li, Role.DOWN)
        assert np.array_equal(folded.linear(li, Role.O).bias,
                              (o.bias + b_o).astype(np.float32) if b_o.any() else o.bias)
        if b_d.any():
            assert np.array_equal(folded.linear(li, Role.DOWN).bias, b_d)
    assert with_rate_bias(ir.replace(prune_means={}), w) is not None


@pytest.mark.parametrize("rate", [0.25])
def test_bias_file_is_deterministic(tiny_llama, tmp_path, rate):
    ir = biased_ir(tiny_llama)
    a = write_gguf_at_rate(ir, rate, tmp_path / "a.gguf", 8)
    b = write_gguf_at_rate(ir, rate, tmp_path / "b.gguf", 8)
    assert a.read_bytes() == b.read_bytes()
