"""Mixed-precision planner: solver, plan files, budget, determinism, replay through the CLI."""
import dataclasses
import itertools
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import EdgeqError
from edgeq.plan import Choice, Option, Plan, choice_bytes, make_plan, plan_bytes, plan_tensor_shapes, solve

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"]


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


# ---- solver --------------------------------------------------------------------------------------

def _random_table(seed, n=5, k=4):
    rng = np.random.default_rng(seed)
    table = {}
    for t in range(n):
        sizes = np.sort(rng.integers(10, 100, k))
        kls = np.sort(rng.random(k))[::-1] * rng.random()
        table[f"blk.0.t{t}"] = [Option(Choice(TYPES[j]), int(sizes[j]), float(kls[j])) for j in range(k)]
    return table


@pytest.mark.parametrize("seed", range(6))
def test_solver_respects_budget_and_is_near_optimal(seed):
    table = _random_table(seed)
    names = sorted(table)
    lo = sum(min(o.nbytes for o in table[n]) for n in names)
    hi = sum(max(o.nbytes for o in table[n]) for n in names)
    for budget in np.linspace(lo, hi, 7).astype(int):
        sel = solve(table, int(budget))
        used = sum(o.nbytes for o in sel.values())
        assert used <= budget
        best = min(sum(o.kl for o in combo) for combo in itertools.product(*(table[n] for n in names))
                   if sum(o.nbytes for o in combo) <= budget)
        got = sum(o.kl for o in sel.values())
        assert got <= best * 1.25 + 1e-12, (budget, got, best)
        assert sel == solve(table, int(budget))  # deterministic


def test_solver_tries_every_option_of_a_giant_tensor():
    """A vocabulary table that is most of the budget: small upgrades of a better KL-per-byte ratio
    than the table's own step win the multiplier, and the greedy pass cannot afford the table's
    step; trying each of its options finds the plan of least KL (checked against brute force)."""
    table = {"token_embd": [Option(Choice("Q5_0"), 100, 1.0), Option(Choice("Q8_0"), 160, 0.0)]}
    for i in range(10):
        table[f"blk.{i}.ffn_up"] = [Option(Choice("Q4_0"), 5, 0.09), Option(Choice("F16"), 10, 0.0)]
    budget = 215
    sel = solve(table, budget)
    got = sum(o.kl for o in sel.values())
    names = sorted(table)
    best = min(sum(o.kl for o in combo) for combo in itertools.product(*(table[n] for n in names))
               if sum(o.nbytes for o in combo) <= budget)
    assert sel["token_embd"].nbytes == 160
    assert sum(o.nbytes for o in sel.values()) <= budget
    assert got == pytest.approx(best)  # 9 small tensors at Q4_0, one at F16: 0.81 (the relaxation alone: 1.0)
    # with a time ceiling the giant's options are tried too, and the ceiling holds
    timed = {n: [dataclasses.replace(o, seconds=o.nbytes * 1e-3) for o in opts] for n, opts in table.items()}
    sel = solve(timed, budget, max_seconds=0.215)
    assert sum(o.seconds for o in sel.values()) <= 0.215 + 1e-12 and sum(o.nbytes for o in sel.values()) <= budget


def test_solver_refuses_an_impossible_budget():
    table = _random_table(0)
    with pytest.raises(EdgeqError, match="below the smallest"):
        solve(table, 5)


# ---- planner on the tiny model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_plan_inputs(tiny_llama):
    from edgeq.calibrate import alpaca_token_sequences, calibrate
    from edgeq.frontend import load_model
    from edgeq.quant.sensitivity import KLProbe

    ir = load_model(tiny_llama)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=6, seq_len=64)
    stats = calibrate(ir, seqs, progress=False)
    return ir, stats, KLProbe(ir, seqs[-2:])


@pytest.mark.parametrize("bpw", [4.6, 5.5, 7.0])
def test_planner_respects_the_budget_and_is_deterministic(tiny_plan_inputs, bpw):
    ir, stats, probe = tiny_plan_inputs
    from edgeq.plan import n_weights

    budget = int(bpw * n_weights(ir) / 8)
    plans = [make_plan(ir, stats, "cpu-avx2", TYPES, [0, 8], budget, probe=probe, progress=False)
             for _ in range(2)]
    assert plans[0].tensors == plans[1].tensors
    assert plan_bytes(ir, plans[0]) <= budget
    plans[0].check(ir)
    shapes = plan_tensor_shapes(ir)
    for name, c in plans[0].tensors.items():
        assert shapes[name][1] % {"Q4_K": 256, "Q6_K": 256}.get(c.type, 32) == 0


def test_measuring_linears_on_threads_gives_the_same_table(tiny_plan_inputs):
    """A layer's linears measured on 3 threads (BLAS pinned to one) give the same table, to the
    bit, as one at a time: the plan cannot depend on the machine's core count."""
    ir, stats, probe = tiny_plan_inputs
    from edgeq.blas import one_blas_thread
    from edgeq.plan import measure_options

    with one_blas_thread():
        one = measure_options(ir, stats, TYPES, [0, 8], probe=probe, progress=False, workers=1)
        three = measure_options(ir, stats, TYPES, [0, 8], probe=probe, progress=False, workers=3)
    assert list(one) == list(three)
    for name in one:
        assert one[name] == three[name], name  # dataclasses: choice, bytes and KL to the bit


def test_more_budget_never_predicts_more_kl(tiny_plan_inputs):
    ir, stats, probe = tiny_plan_inputs
    from edgeq.plan import measure_options, n_weights

    table = measure_options(ir, stats, TYPES, [0, 8], probe=probe, progress=False)
    kls = []
    for bpw in (4.6, 5.0, 6.0, 8.0):
        plan = make_plan(ir, stats, "cpu-avx2", TYPES, [0, 8], int(bpw * n_weights(ir) / 8), table=table)
        kls.append(plan.summary["predicted_kl"])
    assert all(b <= a * (1 + 1e-9) for a, b in zip(kls, kls[1:])), kls


def test_sensitivity_probe_is_zero_for_the_original_weights(tiny_plan_inputs):
    ir, _, probe = tiny_plan_inputs
    lin = next(iter(ir.linears.values()))
    assert abs(probe.linear_kl(lin.layer, lin.role, lin.weight)) < 1e-10
    assert probe.linear_kl(lin.layer, lin.role, np.zeros_like(lin.weight)) > 1e-4
    assert abs(probe.embedding_kl(ir.tensors["token_embd"])) < 1e-10


# ---- plan files ------------------------------------------------------------------------------------

def test_plan_toml_round_trip(tiny_plan_inputs, tmp_path):
    ir, stats, probe = tiny_plan_inputs
    from edgeq.plan import n_weights

    plan = make_plan(ir, stats, "cpu-avx2", TYPES, [0, 8], int(6 * n_weights(ir) / 8), probe=probe, progress=False)
    plan.tensors["blk.0.attn_q"] = Choice("Q4_0", 8)  # a hand edit
    path = plan.save(tmp_path / "p.toml")
    back = Plan.load(path)
    assert back.tensors == plan.tensors
    assert (back.target, back.quantizer, back.compensation, back.damp, back.act_order) == \
        (plan.target, plan.quantizer, plan.compensation, plan.damp, plan.act_order)
    assert back.to_toml() == plan.to_toml()


@pytest.mark.parametrize("edit, msg", [
    (lambda t: t.replace("version = 1", "version = 9"), "plan version"),
    (lambda t: t.replace('type = "Q4_0"', 'type = "Q3_X"', 1), "unknown type"),
    (lambda t: t.replace('quantizer = "gptq"', 'quantizer = "magic"'), "quantizer"),
    (lambda t: t + "\n[[[", "invalid TOML"),
])
def test_bad_plan_files_are_clean_errors(tmp_path, edit, msg):
    text = Plan(target="cpu-avx2", tensors={"token_embd": Choice("Q8_0"), "blk.0.attn_q": Choice("Q4_0")}).to_toml()
    p = tmp_path / "bad.toml"
    p.write_text(edit(text))
    with pytest.raises(EdgeqError, match=msg):
        Plan.load(p)


def test_plan_must_match_the_model(tiny_llama):
    from edgeq.frontend import load_model

    ir = load_model(tiny_llama)
    shapes = plan_tensor_shapes(ir)
    plan = Plan(target="cpu-avx2", tensors={n: Choice("Q4_0") for n in shapes})
    plan.check(ir)
    bad = Plan(target="cpu-avx2", tensors={n: Choice("Q4_0") for n in list(shapes)[1:]})
    with pytest.raises(EdgeqError, match="no choice"):
        bad.check(ir)
    k = Plan(target="cpu-avx2", tensors={n: Choice("Q4_K") for n in shapes})
    with pytest.raises(EdgeqError, match="multiple of 256"):
        k.check(ir)
    assert choice_bytes((64, 64), Choice("Q4_0", 8)) == 64 * 2 * 18 + 2 * 8 * 128


# ---- CLI: plan, build --plan replay, compensation in llama.cpp ----------------------------------

CAL = ("--calib-samples", "6", "--calib-len", "64")


@pytest.fixture(scope="module")
def planned(tiny_llama, tmp_path_factory):
    import llama_cpp  # noqa: F401
    d = tmp_path_factory.mktemp("plan")
    code, text = run_cli("plan", tiny_llama, "--target", "cpu-avx2", "--bpw", "5.5", *CAL, "-o", d / "plan.toml")
    assert code == 0, text
    return d


def test_plan_replay_is_byte_identical(planned, tiny_llama):
    outs = []
    for i in range(2):
        out = planned / f"art{i}"
        code, text = run_cli("build", tiny_llama, "--plan", planned / "plan.toml", *CAL, "-o", out)
        assert code == 0, text
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert "plan.toml" in names
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n
    # the artifact's plan.toml replays the same artifact
    out = planned / "art-again"
    code, text = run_cli("build", tiny_llama, "--plan", outs[0] / "plan.toml", *CAL, "-o", out)
    assert code == 0, text
    assert (out / "model.gguf").read_bytes() == (outs[0] / "model.gguf").read_bytes()
    m = json.loads((outs[0] / "manifest.json").read_text())
    assert m["tensor_types"]["blk.0.attn_q"] == Plan.load(planned / "plan.toml").tensors["blk.0.attn_q"].type


def test_planned_build_without_a_plan_respects_budget_mb(tiny_llama, tmp_path):
    import llama_cpp  # noqa: F401
    out = tmp_path / "a"
    code, text = run_cli("build", tiny_llama, "--budget-mb", "0.11", *CAL, "-o", out)
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    size = m["size"]
    assert size["realised_total_bytes"] <= 0.11e6
    assert abs(size["realised_total_bytes"] - size["predicted_total_bytes"]) <= 0.02 * size["realised_total_bytes"]


def test_compensation_ships_as_a_lora_gguf_that_llama_cpp_applies(planned, tiny_llama):
    """Same types with and without rank-16 branches: llama.cpp must get closer to fp32 with them."""
    base = Plan.load(planned / "plan.toml")
    kl = {}
    for rank in (0, 16):
        p = Plan(target=base.target, tensors={n: Choice("Q4_0", rank if n.startswith("blk.") else 0)
                                              if n != "token_embd" else Choice("Q8_0")
                                              for n in base.tensors})
        path = p.save(planned / f"r{rank}.toml")
        out = planned / f"comp{rank}"
        code, text = run_cli("build", tiny_llama, "--plan", path, *CAL, "-o", out)
        assert code == 0, text
        m = json.loads((out / "manifest.json").read_text())
        assert ("compensation.gguf" in m["adapter_files"]) == (rank > 0)
        from edgeq.verify import verify

        rep = verify(out)
        assert rep.ok, rep.problems
        kl[rank] = rep.reference["0"]["mean_kl"]
    assert kl[16] < kl[0], kl


@pytest.mark.parametrize("args, msg", [
    (("--plan", "missing.toml"), "plan file not found"),
    (("--bits", "4", "--bpw", "5"), "size a planned build"),
    (("--budget-mb", "1", "--bpw", "5"), "not both"),
    (("--budget-mb", "0.001"), "overhead"),
])
def test_bad_plan_options(tiny_llama, tmp_path, args, msg):
    code, text = run_cli("build", tiny_llama, *args, *CAL, "-o", tmp_path / "x")
    assert code == 1 and msg in text, text
    assert not (tmp_path / "x").exists()


# ---- storage types: what a backend cannot write cannot be planned for it --------------------------

@pytest.mark.parametrize("types, fmt, msg", [
    (["Q4_0", "INT4"], "gguf", "INT4 cannot be stored in a gguf artifact"),
    (["Q4_0"], "onnx", "Q4_0 cannot be stored in a onnx artifact"),
    (["INT4"], "onnx", "INT4 cannot be planned"),
    (["Q2_K"], "gguf", "unknown storage type 'Q2_K'"),
])
def test_planner_refuses_types_the_backend_cannot_write(tiny_llama, types, fmt, msg):
    from edgeq.frontend import load_model

    ir = load_model(tiny_llama)
    with pytest.raises(EdgeqError, match=msg):
        make_plan(ir, None, "cpu-avx2", types, [0], 10**9, progress=False, format=fmt)


def test_plan_files_name_types_their_format_stores(tmp_path):
    text = Plan(target="cpu-avx2", tensors={"token_embd": Choice("Q8_0"), "blk.0.attn_q": Choice("Q4_0")}).to_toml()
    p = tmp_path / "int.toml"
    p.write_text(text.replace('type = "Q4_0"', 'type = "INT4"', 1))
    with pytest.raises(EdgeqError, match="blk.0.attn_q: INT4 cannot be stored in a gguf artifact"):
        Plan.load(p)


def test_target_plan_types_are_the_ones_the_format_stores():
    from edgeq.targets import load_target

    cpu = load_target("cpu-avx2")
    assert "INT4" in cpu.quant_types and "Q4_0" in cpu.quant_types
    assert cpu.plan_types("gguf") == tuple(t for t in cpu.quant_types if not t.startswith("INT"))
    assert cpu.plan_types("onnx") == ("INT4", "INT8")


def test_fisher_and_kl_probe_plans_agree_and_unknown_sensitivity_is_an_error(tiny_plan_inputs):
    """The default sensitivity (fisher, one backward pass) and the exact probe (a tail re-run
    per tensor) give plans of the same size and close predicted KL on the tiny model."""
    ir, stats, probe = tiny_plan_inputs
    from edgeq.plan import n_weights

    budget = int(5.0 * n_weights(ir) / 8)
    plans = {s: make_plan(ir, stats, "cpu-avx2", TYPES, [0, 8], budget, probe=probe, progress=False, sensitivity=s)
             for s in ("fisher", "kl-probe")}
    f, k = plans["fisher"], plans["kl-probe"]
    assert plan_bytes(ir, f) <= budget and plan_bytes(ir, k) <= budget
    same = sum(f.tensors[n] == k.tensors[n] for n in f.tensors) / len(f.tensors)
    assert same >= 0.5, same
    assert f.summary["predicted_kl"] == pytest.approx(k.summary["predicted_kl"], rel=0.5)
    with pytest.raises(EdgeqError, match="sensitivity must be one of"):
        make_plan(ir, stats, "cpu-avx2", TYPES, [0, 8], budget, probe=probe, progress=False, sensitivity="magic")


def _same_artifact(a, b):
    """Every file byte-identical; the manifest equal except the options that name the input (and
    the recorded step configs, which hold those options)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n != "manifest.json":
            assert (a / n).read_bytes() == (b / n).read_bytes(), n
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("options")
        m.pop("steps", None)
    assert ma == mb


def test_replay_reproduces_the_original_planned_build(tiny_llama, tmp_path):
    """`build --bpw` (planner) then `build --plan <its plan.toml>`: the same artifact."""
    orig = tmp_path / "orig"
    code, text = run_cli("build", tiny_llama, "--bpw", "4.5", *CAL, "-o", orig)
    assert code == 0, text
    replay = tmp_path / "replay"
    code, text = run_cli("build", tiny_llama, "--plan", orig / "plan.toml", *CAL, "-o", replay)
    assert code == 0, text
    _same_artifact(orig, replay)


def test_replay_with_compensation_branches_reproduces_the_original(planned, tiny_llama, tmp_path):
    """A plan with error-compensation branches (rank > 0): the artifact's own plan.toml replays
    the same bytes, branches included."""
    plan = Plan.load(planned / "plan.toml")
    blocks = sorted(n for n in plan.tensors if n.startswith("blk.0."))[:3]
    for n in blocks:
        plan.tensors[n] = type(plan.tensors[n])(plan.tensors[n].type, 4)
    plan.save(tmp_path / "comp.toml")
    orig = tmp_path / "orig"
    code, text = run_cli("build", tiny_llama, "--plan", tmp_path / "comp.toml", *CAL, "-o", orig)
    assert code == 0, text
    replayed_plan = Plan.load(orig / "plan.toml")
    assert all(replayed_plan.tensors[n].rank == 4 for n in blocks)
    replay = tmp_path / "replay"
    code, text = run_cli("build", tiny_llama, "--plan", orig / "plan.toml", *CAL, "-o", replay)
    assert code == 0, text
    _same_artifact(orig, replay)
    # and the branches are really there: the same plan without them gives a different model
    for n in blocks:
        plan.tensors[n] = type(plan.tensors[n])(plan.tensors[n].type, 0)
    plan.save(tmp_path / "nocomp.toml")
    code, text = run_cli("build", tiny_llama, "--plan", tmp_path / "nocomp.toml", *CAL, "-o", tmp_path / "nocomp")
    assert code == 0, text
    nocomp = tmp_path / "nocomp"
    branch_files = sorted({p.name for p in orig.iterdir()} - {p.name for p in nocomp.iterdir()})
    assert branch_files or any((orig / n).read_bytes() != (nocomp / n).read_bytes()
                               for n in ("model.gguf", "goldens.json")), "rank 4 changed nothing"
