import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.frontend import load_adapter, load_model
from edgeq.ir import Role
from edgeq.passes.naive_sort import NaiveSortConfig, naive_sort
from runtimes.reference import ReferenceSession

SORT_EXACT_REL = 1e-4  # rate 0 after a permutation: float32 re-association only


def _ids(n, vocab, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, n).tolist()


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_naive_sort_exact_at_rate_0(tiny_model):
    ir = load_model(tiny_model)
    ids = _ids(40, ir.hparams.vocab_size)
    base = ReferenceSession(ir).logits(ids)
    out = naive_sort(ir)
    assert _rel(ReferenceSession(out).logits(ids), base) <= SORT_EXACT_REL
    assert out.history[-1].name == "naive_sort" and ir.rope_index == {}
    # it really permuted: non-identity RoPE order and MLP channels moved
    assert any(not np.array_equal(idx[g], np.arange(idx.shape[1])) for idx in out.rope_index.values()
               for g in range(idx.shape[0]))
    assert not np.array_equal(out.linear(0, Role.GATE).weight, ir.linear(0, Role.GATE).weight)


def test_naive_sort_orders_by_weight_norm(tiny_llama):
    out = naive_sort(load_model(tiny_llama))
    for i in range(out.hparams.num_layers):
        g, u, d = (out.linear(i, r).weight for r in (Role.GATE, Role.UP, Role.DOWN))
        s = np.linalg.norm(g, axis=1) * np.linalg.norm(u, axis=1) * np.linalg.norm(d, axis=0)
        assert np.all(np.diff(s) <= 1e-6)
        hp = out.hparams
        D, KV, group = hp.head_dim, hp.num_kv_heads, hp.num_heads // hp.num_kv_heads
        v = out.linear(i, Role.V).weight.reshape(KV, D, -1)
        o = out.linear(i, Role.O).weight.reshape(-1, hp.num_heads, D)
        for grp in range(KV):
            vs = np.linalg.norm(v[grp], axis=1) * np.sqrt((o[:, grp * group:(grp + 1) * group] ** 2).sum((0, 1)))
            assert np.all(np.diff(vs) <= 1e-6)


def test_naive_sort_composes_and_keeps_lora_exact(tiny_llama, tiny_llama_lora):
    ir = load_adapter(load_model(tiny_llama), tiny_llama_lora)  # kept as a separate branch
    ids = _ids(24, ir.hparams.vocab_size, seed=1)
    base = ReferenceSession(ir).logits(ids)
    once = naive_sort(ir)
    twice = naive_sort(once)  # already sorted: the same model, composed rope_index
    assert _rel(ReferenceSession(once).logits(ids), base) <= SORT_EXACT_REL
    for i, idx in once.rope_index.items():
        np.testing.assert_array_equal(twice.rope_index[i], idx)
    with pytest.raises(EdgeqError, match="NaiveSortConfig"):
        naive_sort(ir, config=object())
    assert naive_sort(ir, NaiveSortConfig(), None).history[-1].name == "naive_sort"
