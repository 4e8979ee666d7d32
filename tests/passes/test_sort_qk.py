"""sort_qk: RoPE-pair sort of Q/K per KV group (exact at rate 0 with gathered frequencies)."""
import dataclasses

import numpy as np

from edgeq.frontend import load_adapter, load_model
from edgeq.ir import Role
from edgeq.passes import run_pass
from edgeq.passes.sort_mlp import sort_order
from edgeq.passes.sort_qk import SortQKConfig, head_perm, qk_pair_scores
from edgeq.tolerances import SORT_EXACT_MAX_REL


def test_exact_at_rate_zero(model, rel_err):
    ir, stats = model
    out = run_pass(ir, SortQKConfig(), stats)
    assert rel_err(ir, out) <= SORT_EXACT_MAX_REL
    assert [r.name for r in out.history] == ["sort_qk"] and not ir.rope_index
    out.validate()


def test_pairs_sorted_per_group_and_rope_index(model, calibrate_tiny):
    ir, stats = model
    hp = ir.hparams
    H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
    out = run_pass(ir, SortQKConfig(), stats)
    assert set(out.rope_index) == set(range(hp.num_layers))
    for i in range(hp.num_layers):
        scores = qk_pair_scores(stats.layers[i].q_diag, stats.layers[i].k_diag)
        assert scores.shape == (KV, D // 2)
        idx = out.rope_index[i]
        assert idx.shape == (KV, D // 2)
        assert not np.array_equal(idx, np.tile(np.arange(D // 2), (KV, 1)))
        for g in range(KV):
            np.testing.assert_array_equal(idx[g], sort_order(scores[g]))
            assert np.all(np.diff(scores[g][idx[g]]) <= 0)
            rows = head_perm(idx[g])
            np.testing.assert_array_equal(out.linear(i, Role.K).weight[g * D:(g + 1) * D],
                                          ir.linear(i, Role.K).weight[g * D + rows])
            for h in range(g * (H // KV), (g + 1) * (H // KV)):  # every query head of the group
                np.testing.assert_array_equal(out.linear(i, Role.Q).weight[h * D:(h + 1) * D],
                                              ir.linear(i, Role.Q).weight[h * D + rows])
                if ir.linear(i, Role.Q).bias is not None:
                    np.testing.assert_array_equal(out.linear(i, Role.Q).bias[h * D:(h + 1) * D],
                                                  ir.linear(i, Role.Q).bias[h * D + rows])
        # groups get their own orders (GQA): at least one layer differs between groups
    assert any(not np.array_equal(out.rope_index[i][0], out.rope_index[i][1]) for i in range(hp.num_layers))
    # recalibrated, the sorted model's pairs are already in order
    again = calibrate_tiny(out)
    for L in again.layers:
        s = qk_pair_scores(L.q_diag, L.k_diag)
        assert np.all(np.diff(s, axis=1) <= 1e-9 * s.max())


def test_composes_with_existing_rope_index(model, rel_err):
    ir, stats = model
    first = run_pass(ir, SortQKConfig(), stats)
    rng = np.random.RandomState(3)
    fake = tuple(dataclasses.replace(L, q_diag=rng.rand(*L.q_diag.shape), k_diag=rng.rand(*L.k_diag.shape))
                 for L in stats.layers)
    second = run_pass(first, SortQKConfig(), dataclasses.replace(stats, layers=fake, source={}))
    assert rel_err(ir, second) <= SORT_EXACT_MAX_REL
    for i, L in enumerate(fake):  # slot j of the result holds original pair first[order[j]]
        order = np.stack([sort_order(s) for s in qk_pair_scores(L.q_diag, L.k_diag)])
        np.testing.assert_array_equal(second.rope_index[i], np.take_along_axis(first.rope_index[i], order, 1))


def test_lora_branches_are_permuted_consistently(tiny_qwen2, tiny_qwen2_lora, rel_err, calibrate_tiny):
    ir = load_adapter(load_model(tiny_qwen2), tiny_qwen2_lora)
    out = run_pass(ir, SortQKConfig(), calibrate_tiny(ir))
    assert out.linear(0, Role.Q).low_rank
    assert rel_err(ir, out) <= SORT_EXACT_MAX_REL
