"""Run-time rate switching in the reference runtime: prefix property, no copies, KV-cache policy."""
import dataclasses
import time

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.frontend import load_model
from edgeq.ir import ModelIR, Role
from edgeq.passes.naive_sort import naive_sort
from edgeq.passes.rate_plan import apply_prune_spec, plan_rates, realised_rate
from runtimes.reference import ReferenceSession

RATES = (0.0, 0.15, 0.25, 0.35)
PREFIX_MAX_ABS = 1e-5  # pruned run vs the full model with the tail zeroed: same sums, other order
DECODE_MAX_ABS = 1e-5  # cached decode vs a fresh full forward
SWITCHES = 1000


def _ids(n, vocab, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, n).tolist()


def _pruned(model_dir, mode="angular") -> ModelIR:
    """Naive-sorted (non-identity rope_index) tiny model carrying RATES (angular: the two layers
    pruned unevenly; uniform: both pruned in every dimension)."""
    ir = naive_sort(load_model(model_dir))
    imp = np.array([0.1, 0.3]) if mode == "angular" else None
    spec = plan_rates(ir, RATES, granularity=32, importance=imp, mode=mode)
    return apply_prune_spec(ir, spec)


def _masked(ir: ModelIR, rate: float) -> ModelIR:
    """The full model with every pruned row / column zeroed, built from the HF layout (not the
    runtime's): a run of it at rate 0 is what a run at ``rate`` must equal."""
    hp = ir.hparams
    H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
    half, group = D // 2, H // KV
    linears = dict(ir.linears)

    def zero(lin, rows=None, cols=None):
        rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        cols = None if cols is None else np.asarray(cols, dtype=np.int64)
        w = lin.weight.copy()
        b = None if lin.bias is None else lin.bias.copy()
        lrs = []
        for lr in lin.low_rank:
            a, bb = lr.a.copy(), lr.b.copy()
            if rows is not None:
                bb[rows] = 0
            if cols is not None:
                a[:, cols] = 0
            lrs.append(dataclasses.replace(lr, a=a, b=bb))
        if rows is not None:
            w[rows] = 0
            if b is not None:
                b[rows] = 0
        if cols is not None:
            w[:, cols] = 0
        linears[lin.name] = dataclasses.replace(lin, weight=w, bias=b, low_rank=tuple(lrs))

    for i, w in enumerate(ir.prune.at(rate)):
        zero(ir.linear(i, Role.GATE), rows=np.arange(w.ffn, hp.intermediate_size))
        zero(ir.linear(i, Role.UP), rows=np.arange(w.ffn, hp.intermediate_size))
        zero(ir.linear(i, Role.DOWN), cols=np.arange(w.ffn, hp.intermediate_size))
        tail = [hf * half + s for hf in (0, 1) for s in range(w.qk_pairs, half)]  # both halves of a head
        zero(ir.linear(i, Role.Q), rows=[h * D + t for h in range(H) for t in tail])
        zero(ir.linear(i, Role.K), rows=[g * D + t for g in range(KV) for t in tail])
        zero(ir.linear(i, Role.V), rows=[g * D + c for g in range(KV) for c in range(w.v_dims, D)])
        zero(ir.linear(i, Role.O), cols=[h * D + c for h in range(H) for c in range(w.v_dims, D)])
        assert group * KV == H
    return ir.replace(linears=linears, prune=None)


@pytest.mark.parametrize("mode", ["angular", "uniform"])
def test_prefix_property_equals_masked_full_model(tiny_model, mode):
    ir = _pruned(tiny_model, mode)
    assert any(not np.array_equal(idx[g], np.arange(idx.shape[1]))
               for idx in ir.rope_index.values() for g in range(idx.shape[0]))
    ids = _ids(32, ir.hparams.vocab_size)
    s = ReferenceSession(ir)
    full = s.logits(ids)
    for r in RATES:
        s.set_prune_rate(r)
        got = s.logits(ids)
        want = ReferenceSession(_masked(ir, r)).logits(ids)
        assert np.abs(got - want).max() <= PREFIX_MAX_ABS, r
        if r > 0:
            assert np.abs(got - full).max() > 100 * PREFIX_MAX_ABS  # pruning changed something
            assert abs(realised_rate(ir, ir.prune.at(r)) - r) <= 0.1


def test_switch_is_copy_free_and_o1(tiny_llama):
    ir = _pruned(tiny_llama)
    s = ReferenceSession(ir)
    addr = [(b.__array_interface__["data"][0], b.shape) for b in s.weight_buffers()]
    ids = _ids(8, ir.hparams.vocab_size)
    bytes_at = []
    for r in RATES + RATES[::-1]:
        s.set_prune_rate(r)
        s.logits(ids)
        bytes_at.append(s.resident_weight_bytes())
        assert [(b.__array_interface__["data"][0], b.shape) for b in s.weight_buffers()] == addr
    assert bytes_at[:4] == sorted(bytes_at[:4], reverse=True) and bytes_at[0] > bytes_at[3]
    times = []
    for k in range(SWITCHES):
        r = RATES[k % len(RATES)]
        t0 = time.perf_counter()
        s.set_prune_rate(r)
        times.append(time.perf_counter() - t0)
    print(f"set_prune_rate median {np.median(times) * 1e6:.2f} us over {SWITCHES} switches (tiny)")
    assert [(b.__array_interface__["data"][0], b.shape) for b in s.weight_buffers()] == addr
    # O(1): a switch costs a small fraction of one decode step, even of this tiny model's (a copy
    # or re-slice of the weights would cost about a step: every weight is touched once per step)
    step = _decode_step_seconds(s, ids)
    assert np.median(times) < SWITCH_MAX_SHARE_OF_STEP * step, (np.median(times), step)


# A switch may cost at most this share of one decode step (measured: ~1% on the tiny model).
SWITCH_MAX_SHARE_OF_STEP = 0.25


def _decode_step_seconds(s, ids, n: int = 16) -> float:
    """Median seconds of one decode step (one token appended to the context)."""
    s._start(ids)
    steps = []
    for k in range(n):
        t0 = time.perf_counter()
        s._step(ids[k % len(ids)])
        steps.append(time.perf_counter() - t0)
    return float(np.median(steps))


def test_recompute_after_switch_equals_fresh_run(tiny_model):
    ir = _pruned(tiny_model)
    ids = _ids(24, ir.hparams.vocab_size, seed=3)
    s = ReferenceSession(ir)
    s._start(ids[:16])
    for r in (0.25, 0.15, 0.35, 0.0):
        s.set_prune_rate(r, kv="recompute")
        n = s._pos
        got = s._step(ids[n])
        fresh = ReferenceSession(ir)
        fresh.set_prune_rate(r)
        want = fresh.logits(ids[:n + 1])[-1]
        assert np.abs(got - want).max() <= DECODE_MAX_ABS, r


def test_keep_policy(tiny_model):
    """kv="keep": cached positions stay as computed at their own rate. Switching away and back
    with no token in between changes nothing; decoding after a switch attends to the old
    positions' K/V prefix as cached (so it differs from a recompute, except where the cache
    holds exactly what the new rate would compute)."""
    ir = _pruned(tiny_model)
    ids = _ids(20, ir.hparams.vocab_size, seed=4)
    a = ReferenceSession(ir)
    a._start(ids[:12])
    want = a._step(ids[12])
    b = ReferenceSession(ir)
    b._start(ids[:12])
    for r in (0.35, 0.15, 0.25, 0.0):
        b.set_prune_rate(r)  # kv="keep"
    assert np.array_equal(b._step(ids[12]), want)

    keep, rec = ReferenceSession(ir), ReferenceSession(ir)
    for s in (keep, rec):
        s._start(ids[:12])
    keep.set_prune_rate(0.25)
    rec.set_prune_rate(0.25, kv="recompute")
    x, y = keep._step(ids[12]), rec._step(ids[12])
    assert np.abs(x - y).max() > 100 * DECODE_MAX_ABS  # the policy matters
    # keep: the old positions' cached K/V are the rate-0 ones (prefix), the new one the rate-0.25 one
    L0 = ir.prune.at(0.25)[0]
    full = ReferenceSession(ir)
    full._start(ids[:12])
    np.testing.assert_array_equal(keep._k[0, :12, :, :, :L0.qk_pairs], full._k[0, :12, :, :, :L0.qk_pairs])
    np.testing.assert_array_equal(keep._k[0, 12], rec._k[0, 12])


def test_keep_policy_no_stale_cache_tail(tiny_llama):
    """Documented kv="keep" semantics: dims a larger rate adds are zero for old positions."""
    ir = _pruned(tiny_llama)
    rng = np.random.RandomState(5)
    first, second = rng.randint(0, 384, 20).tolist(), rng.randint(0, 384, 10).tolist()
    s = ReferenceSession(ir)
    s.logits(first)  # rate 0 fills every dim of positions 0..19
    s.set_prune_rate(0.35)
    s.logits(second)  # a new context at 0.35 writes positions 0..9, kept dims only
    s.set_prune_rate(0.0)
    got = s._step(7)
    clean = ReferenceSession(ir)
    clean.set_prune_rate(0.35)
    clean._start(second)
    clean.set_prune_rate(0.0)
    assert np.abs(got - clean._step(7)).max() <= DECODE_MAX_ABS


def test_rate_not_carried_names_available(tiny_llama):
    s = ReferenceSession(_pruned(tiny_llama))
    with pytest.raises(EdgeqError, match=r"0\.3 is not carried .*available: 0, 0\.15, 0\.25, 0\.35"):
        s.set_prune_rate(0.3)
    with pytest.raises(EdgeqError, match="kv policy"):
        s.set_prune_rate(0.25, kv="drop")
    assert s.prune_rates == RATES
    plain = ReferenceSession(load_model(tiny_llama))
    with pytest.raises(EdgeqError, match="carries only 0"):
        plain.set_prune_rate(0.25)


@pytest.mark.slow
def test_smollm2_plan_switch_and_decode(smollm2_dir):
    base = load_model(smollm2_dir)
    ir = naive_sort(base)
    spec = plan_rates(ir, RATES, granularity=32, mode="uniform")
    ir = apply_prune_spec(ir, spec)
    s = ReferenceSession(ir, n_ctx=256)
    ids = s.tokenize("The capital of France is")
    want = ReferenceSession(base, n_ctx=256).logits(ids)
    assert np.abs(s.logits(ids) - want).max() <= 1e-4 * np.abs(want).max()  # the sort is exact at rate 0
    addr = [b.__array_interface__["data"][0] for b in s.weight_buffers()]
    times = []
    for k in range(SWITCHES):
        t0 = time.perf_counter()
        s.set_prune_rate(RATES[k % len(RATES)])
        times.append(time.perf_counter() - t0)
    print(f"set_prune_rate median {np.median(times) * 1e6:.2f} us over {SWITCHES} switches (SmolLM2)")
    assert np.median(times) < SWITCH_MAX_SHARE_OF_STEP * _decode_step_seconds(s, ids)
    s.set_prune_rate(0.25)
    out = list(s.generate_ids(ids, max_tokens=8, stop_at_eos=False))
    print(f"rate 0.25: {s.detokenize(out)!r}")
    assert len(out) == 8
    assert [b.__array_interface__["data"][0] for b in s.weight_buffers()] == addr
    assert s.resident_weight_bytes(0.25) < s.resident_weight_bytes(0.0)
    for r in RATES:
        assert abs(realised_rate(ir, spec.at(r)) - r) <= 1e-3
