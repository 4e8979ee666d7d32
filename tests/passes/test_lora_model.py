"""The torch forward of the passes (edgeq.passes.lora_model) on Gemma 3: the same model as
transformers' Gemma3ForCausalLM (the oracle) and as the reference runtime at an MLP-pruned rate with
bias compensation (added before the sandwich post-norm, as deployed); Q/K pairs under QK-norm refused."""
import dataclasses

import numpy as np
import pytest

import torch

from edgeq.errors import EdgeqError
from edgeq.frontend import load_model
from edgeq.ir import LayerMeans, LayerWidths, PruneSpec
from edgeq.passes.lora_model import LoraModel, widths_at
from runtimes.reference import ReferenceSession

VS_TRANSFORMERS_MAX_REL = 1e-5  # float32 on both sides: max |Δlogit| / max |logit|
VS_REFERENCE_MAX_REL = 1e-5
N_TOKENS = 40  # 5 x the tiny model's sliding window (8)


def _ids(n, vocab, seed=0, batch=2):
    return np.random.RandomState(seed).randint(0, vocab, (batch, n))


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("which", ["tiny_gemma3", "tiny_gemma3_scaled"])
def test_forward_matches_transformers(which, request):
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(which)
    ir = load_model(model_dir)
    ids = _ids(N_TOKENS, ir.hparams.vocab_size)
    with torch.no_grad():
        ours = LoraModel(ir, rank=1).logits(torch.from_numpy(ids), use_lora=False).numpy()
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(theirs).max() > 0.05
    assert _rel(ours, theirs) <= VS_TRANSFORMERS_MAX_REL
    # the window matters at this length: without it the logits differ far beyond the bound
    model = LoraModel(ir, rank=1)
    model.hp = dataclasses.replace(ir.hparams, layer_types=None)
    with torch.no_grad():
        no_window = model.logits(torch.from_numpy(ids), use_lora=False).numpy()
    assert _rel(no_window, theirs) > 100 * VS_TRANSFORMERS_MAX_REL


def _mlp_pruned(ir, seed=0):
    """A hand-made MLP-only PruneSpec (Q/K pairs and V/O components kept, per-layer ffn widths)
    with random mean inputs for bias compensation."""
    hp = ir.hparams
    f, half, D = hp.intermediate_size, hp.head_dim // 2, hp.head_dim
    rng = np.random.default_rng(seed)
    widths = {0.0: tuple(LayerWidths(f, half, D) for _ in range(hp.num_layers)),
              0.25: tuple(LayerWidths(f - 32 * (1 + i % 2), half, D) for i in range(hp.num_layers))}
    means = {i: LayerMeans(down=rng.normal(0, 0.2, f), o=rng.normal(0, 0.2, hp.num_heads * D))
             for i in range(hp.num_layers)}
    out = ir.replace(prune=PruneSpec(rates=(0.0, 0.25), widths=widths, granularity=32, importance="uniform",
                                     dims="mlp"), prune_means=means)
    out.validate()
    return out


def test_mlp_pruned_rate_with_bias_compensation_is_the_deployed_model(tiny_gemma3):
    ir = _mlp_pruned(load_model(tiny_gemma3))
    ids = _ids(N_TOKENS, ir.hparams.vocab_size, seed=1, batch=1)[0]
    model = LoraModel(ir, rank=1)
    for rate in (0.0, 0.25):
        s = ReferenceSession(ir, n_ctx=N_TOKENS)
        s.set_prune_rate(rate)
        want = s.logits(list(ids))
        with torch.no_grad():
            got = model.logits(torch.from_numpy(ids[None]), widths_at(ir, rate), use_lora=False)[0].numpy()
        assert _rel(got, want) <= VS_REFERENCE_MAX_REL, rate
    # the compensation changes the pruned rate's logits (so the comparison above checks it)
    s0 = ReferenceSession(ir.replace(prune_means={}), n_ctx=N_TOKENS)
    s0.set_prune_rate(0.25)
    assert _rel(s0.logits(list(ids)), want) > 100 * VS_REFERENCE_MAX_REL


def test_qk_pairs_under_qk_norm_are_refused(tiny_gemma3):
    ir = load_model(tiny_gemma3)
    hp = ir.hparams
    w = tuple(LayerWidths(hp.intermediate_size, hp.head_dim // 2 - 1, hp.head_dim) for _ in range(hp.num_layers))
    with pytest.raises(EdgeqError, match="QK-norm models keep every Q/K pair"):
        LoraModel(ir, rank=1).logits(torch.from_numpy(_ids(8, hp.vocab_size, batch=1)), w, use_lora=False)
