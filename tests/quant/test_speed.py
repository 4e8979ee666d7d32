"""The planner's decode-speed cost model (edgeq.quant.speed) and the speed-constrained solver
(edgeq.quant.solve)."""
import itertools
import json
import math

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.ir import HParams, weight_matrix_shapes
from edgeq.quant import speed as sp
from edgeq.quant import storage
from edgeq.quant.solve import solve


def _hp(tied: bool) -> HParams:
    return HParams(arch="llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=256,
                   tie_word_embeddings=tied, attention_bias=False)


class C:  # a plan choice (edgeq.plan.Choice's attributes)
    def __init__(self, type, rank=0):
        self.type, self.rank = type, rank


@pytest.mark.parametrize("tied", [True, False])
def test_roofline_model_is_the_roofline_of_the_bytes_a_token_reads(tied):
    """The roofline speed model of a plan gives the same seconds per token as edgeq.roofline's
    memory bound (context 0) for the weight bytes a token multiplies."""
    from edgeq.roofline import predict, token_cost

    hp = _hp(tied)
    m = sp.roofline_model("x", "gguf", 50.0)
    plan = {n: C("Q4_0" if i % 2 else "Q8_0") for i, n in enumerate(weight_matrix_shapes(hp))}
    shapes = weight_matrix_shapes(hp)
    read = sum(storage.get(c.type).nbytes(shapes[n]) for n, c in plan.items()
               if n != "token_embd" or tied)  # an untied embedding is looked up, not multiplied
    want = 1 / predict(token_cost(hp, read), 50.0, 1e9, context=0)["decode_memory_tok_s"]
    assert math.isclose(sp.plan_seconds(hp, plan, m), want, rel_tol=1e-12)
    assert set(sp.matmul_weights(hp)) == set(shapes) - ({"token_embd"} if not tied else set())


def test_roofline_branch_costs_its_fp16_factors():
    m = sp.roofline_model("x", "gguf", 10.0)
    base = m.tensor_seconds((128, 64), "Q4_0", 0)
    assert math.isclose(m.tensor_seconds((128, 64), "Q4_0", 16) - base, 16 * (128 + 64) * 2 / 10e9, rel_tol=1e-12)
    assert m.tensor_seconds((384, 64), "Q8_0", 0, multiplied=False) == 0.0
    with pytest.raises(EdgeqError, match="bandwidth"):
        sp.roofline_model("x", "gguf", 0.0)


def test_measured_table_round_trip_and_fallbacks(tmp_path):
    path = tmp_path / "costs.json"
    entry = {"profile": "p", "backend": "gguf", "source": "measured",
             "seconds_per_weight": {"Q4_0": 1e-10, "Q8_0": 1.5e-10}, "branch_call_s": 2e-6,
             "branch_s_per_param": 1e-9, "date": "2026-12-03"}
    sp.store_measured(entry, path)
    sp.store_measured(dict(entry, profile="a"), path)
    sp.store_measured(dict(entry, branch_call_s=3e-6), path)  # replaces p/gguf
    tables = json.loads(path.read_text())["tables"]
    assert [(t["profile"], t["backend"]) for t in tables] == [("a", "gguf"), ("p", "gguf")]
    m = sp.speed_model("p", "gguf", 50.0, path=path)
    assert (m.source, m.branch_call_s, m.seconds_per_weight["Q4_0"]) == ("measured", 3e-6, 1e-10)
    # a type the table lacks: scaled by bytes from the nearest measured type (Q5_0 5.5 bpw <- Q4_0 4.5 bpw)
    assert math.isclose(m.seconds_per_weight["Q5_0"], 1e-10 * 5.5 / 4.5, rel_tol=1e-12)
    assert sp.speed_model("p", "onnx", 50.0, path=path).source == "roofline"
    assert sp.speed_model("other", "gguf", 50.0, path=path).source == "roofline"
    path.write_text("{not json")
    with pytest.raises(EdgeqError, match="speed cost table"):
        sp.speed_model("p", "gguf", 50.0, path=path)


def test_the_committed_cpu_table_covers_the_profiles_gguf_candidates():
    from edgeq.targets import load_target

    t = load_target("cpu-avx2")
    m = sp.measured_model("cpu-avx2", "gguf")
    assert m is not None and m.source == "measured"
    for name in t.plan_types("gguf"):
        assert m.seconds_per_weight[name] > 0, name
    assert m.branch_call_s >= 0 and m.branch_s_per_param >= 0
    # 8.5 bits per weight cost more to stream than 4.5 on any host
    assert m.seconds_per_weight["Q8_0"] > m.seconds_per_weight["Q4_0"]


def test_uniform_reference_is_the_one_type_plan_nearest_the_budget():
    hp = _hp(True)
    shapes = weight_matrix_shapes(hp)
    size = {t: sum(storage.get(t).nbytes(s) for s in shapes.values()) for t in ("Q4_0", "Q5_0", "Q8_0")}
    types = ["Q8_0", "Q4_0", "Q5_0", "Q4_K"]  # Q4_K: rows of 64 are not a multiple of 256 -> no one-type plan
    mid = (size["Q4_0"] + size["Q5_0"]) // 2
    assert sp.uniform_reference(hp, types, size["Q5_0"] + 1)[0] == "Q5_0"
    assert sp.uniform_reference(hp, types, size["Q5_0"] - 1)[0] == "Q5_0"
    assert sp.uniform_reference(hp, types, mid - 1)[0] == "Q4_0"
    assert sp.uniform_reference(hp, types, mid + 1)[0] == "Q5_0"
    assert sp.uniform_reference(hp, types, size["Q4_0"] - 1000)[0] == "Q4_0"
    assert sp.uniform_reference(hp, types, 10 ** 12)[0] == "Q8_0"
    with pytest.raises(EdgeqError, match="no candidate type"):
        sp.uniform_reference(hp, ["Q4_K"], 10 ** 12)


# ---- the solver with a time ceiling -----------------------------------------------------------------

class O:
    def __init__(self, nbytes, kl, seconds):
        self.nbytes, self.kl, self.seconds = nbytes, kl, seconds

    def __repr__(self):
        return f"O({self.nbytes}, {self.kl:.3g}, {self.seconds:.3g})"


def _table(seed, n=5, k=4):
    """Bigger options have less KL; their time is not monotone in bytes (a slow kernel / a branch)."""
    rng = np.random.default_rng(seed)
    table = {}
    for t in range(n):
        sizes = np.sort(rng.integers(10, 100, k))
        kls = np.sort(rng.random(k))[::-1]
        secs = sizes * (1 + rng.random(k))
        table[f"blk.0.t{t}"] = [O(int(sizes[j]), float(kls[j]), float(secs[j])) for j in range(k)]
    return table


@pytest.mark.parametrize("seed", range(6))
def test_solver_meets_budget_and_time_and_is_near_optimal(seed):
    table = _table(seed)
    names = sorted(table)
    combos = list(itertools.product(*(table[n] for n in names)))
    lo_b, hi_b = sum(min(o.nbytes for o in table[n]) for n in names), sum(max(o.nbytes for o in table[n]) for n in names)
    lo_s, hi_s = (sum(f(o.seconds for o in table[n]) for n in names) for f in (min, max))
    checked = 0
    for budget in np.linspace(lo_b, hi_b, 5).astype(int):
        for ceiling in np.linspace(lo_s, hi_s, 6)[1:]:
            ok = [c for c in combos if sum(o.nbytes for o in c) <= budget and sum(o.seconds for o in c) <= ceiling]
            if not ok:
                continue
            sel = solve(table, int(budget), float(ceiling))
            assert sum(o.nbytes for o in sel.values()) <= budget
            assert sum(o.seconds for o in sel.values()) <= ceiling * (1 + 1e-12)
            best = min(sum(o.kl for o in c) for c in ok)
            got = sum(o.kl for o in sel.values())
            assert got <= best * 1.5 + 1e-12, (budget, ceiling, got, best)
            assert sel == solve(table, int(budget), float(ceiling))  # deterministic
            checked += 1
    assert checked >= 10


def test_a_loose_ceiling_changes_nothing_and_an_impossible_one_is_an_error():
    table = _table(3)
    budget = sum(max(o.nbytes for o in v) for v in table.values()) // 2
    assert solve(table, budget, 1e30) == solve(table, budget)
    fastest = sum(min(o.seconds for o in v) for v in table.values())
    with pytest.raises(EdgeqError, match="no plan is fast enough"):
        solve(table, budget, fastest * 0.99)
