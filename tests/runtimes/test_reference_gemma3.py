"""The reference runtime's Gemma 3 blocks against transformers' Gemma3ForCausalLM forward (the
oracle), on tiny random checkpoints whose prompts cross the sliding window."""
import dataclasses

import numpy as np
import pytest

from edgeq.frontend import load_model
from runtimes.reference import ReferenceSession, streamed_logits

REF_VS_TRANSFORMERS_MAX_REL_F64 = 1e-4  # issue 17: max |Δlogit| / max |logit|, float64 mode
N_TOKENS = 24  # > 2 x the tiny model's sliding window (8)


def _hf_logits(model_dir, ids, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


def _ids(n, vocab, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, n).tolist()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("which", ["tiny_gemma3", "tiny_gemma3_scaled"])
def test_float64_logits_match_transformers(which, request):
    import torch

    model_dir = request.getfixturevalue(which)
    ir = load_model(model_dir)
    ids = _ids(N_TOKENS, ir.hparams.vocab_size)
    ours = ReferenceSession(ir, n_ctx=64, dtype=np.float64).logits(ids)
    theirs = _hf_logits(model_dir, ids, torch.float64)
    assert _rel(ours, theirs) <= REF_VS_TRANSFORMERS_MAX_REL_F64
    assert np.abs(theirs).max() > 0.05  # not a degenerate model


def test_float32_logits_match_transformers(tiny_gemma3):
    import torch

    ir = load_model(tiny_gemma3)
    ids = _ids(N_TOKENS, ir.hparams.vocab_size, seed=1)
    assert _rel(ReferenceSession(ir, n_ctx=64).logits(ids), _hf_logits(tiny_gemma3, ids, torch.float32)) <= 1e-5


def test_each_gemma_block_matters(tiny_gemma3):
    """Dropping any one of the family's blocks moves the logits far beyond the oracle bound, so
    the transformers comparison above checks every one of them."""
    ir = load_model(tiny_gemma3)
    hp = ir.hparams
    ids = _ids(N_TOKENS, hp.vocab_size, seed=2)
    base = ReferenceSession(ir, n_ctx=64, dtype=np.float64).logits(ids)
    variants = {
        "no window": dict(layer_types=None),
        "global RoPE base everywhere": dict(rope_local_theta=None),
        "silu": dict(hidden_act="silu"),
        "no embedding scale": dict(embedding_scale=1.0),
        "head_dim query scale": dict(query_pre_attn_scalar=8.0),
    }
    for what, change in variants.items():
        other = ir.replace(hparams=dataclasses.replace(hp, **change))
        got = ReferenceSession(other, n_ctx=64, dtype=np.float64).logits(ids)
        assert _rel(got, base) > 100 * REF_VS_TRANSFORMERS_MAX_REL_F64, what
    assert hp.sliding_window < N_TOKENS and hp.layer_types.count("full_attention") == 1


def test_kv_cache_decode_equals_full_forward(tiny_gemma3):
    s = ReferenceSession(load_model(tiny_gemma3), n_ctx=64)
    ids = _ids(N_TOKENS, s.hp.vocab_size, seed=4)
    full = s.logits(ids)
    first = s._start(ids[:5])
    steps = [s._step(t) for t in ids[5:]]
    np.testing.assert_allclose(first, full[4], atol=1e-5)
    np.testing.assert_allclose(np.stack(steps), full[5:], atol=1e-5)


def test_streamed_logits_equal_the_session(tiny_gemma3):
    ir = load_model(tiny_gemma3)
    seqs = [_ids(n, ir.hparams.vocab_size, seed=5 + n) for n in (N_TOKENS, 11)]
    got = streamed_logits(ir, seqs, dtype=np.float64)
    for seq, lg in zip(seqs, got):
        np.testing.assert_allclose(lg, ReferenceSession(ir, n_ctx=64, dtype=np.float64).logits(seq), atol=1e-9)


def test_separate_lora_branch_matches_peft(tiny_gemma3, tiny_dir):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from edgeq.frontend import load_adapter
    from models.tiny import make_random_lora

    lora = make_random_lora(tiny_gemma3, tiny_dir / "tiny-gemma3-lora", r=4, alpha=8, seed=6)
    ir = load_adapter(load_model(tiny_gemma3), lora)
    ids = _ids(N_TOKENS, ir.hparams.vocab_size, seed=7)
    ours = ReferenceSession(ir, n_ctx=64, dtype=np.float64).logits(ids)
    m = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float64),
                                       lora).eval()
    with torch.no_grad():
        theirs = m(torch.tensor([ids])).logits[0].numpy()
    assert _rel(ours, theirs) <= REF_VS_TRANSFORMERS_MAX_REL_F64
    base = ReferenceSession(load_model(tiny_gemma3), n_ctx=64, dtype=np.float64).logits(ids)
    assert _rel(base, theirs) > 100 * REF_VS_TRANSFORMERS_MAX_REL_F64  # the adapter matters


@pytest.mark.slow
def test_gemma3_270m_logits_match_transformers(gemma3_dir):
    """The materialised Gemma 3 270M, float64 mode, over a prompt longer than its 512-token
    sliding window (the last 64 positions, where the sliding and global layers see different
    keys). Measured 2026-12-03: see docs/benchmarks.md, "Issue 17 — Gemma 3"."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeq.evaluate import wikitext2_test_text

    ir = load_model(gemma3_dir)
    s = ReferenceSession(ir, n_ctx=640, dtype=np.float64)
    ids = s.tokenize(wikitext2_test_text()[:20000])[:600]
    assert len(ids) == 600 > ir.hparams.sliding_window
    ours = s._forward(ids, 0)[-64:] @ s.out_t
    del s
    m = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        theirs = m(torch.tensor([ids]), logits_to_keep=64).logits[0].numpy()
    assert _rel(ours, theirs) <= REF_VS_TRANSFORMERS_MAX_REL_F64
