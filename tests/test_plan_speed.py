"""The planner with a decode-speed floor (issue 16, item 4): ``make_plan(speed=, min_speed=)``,
``edgeq plan/build --min-speed``."""
import json

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.plan import Plan, make_plan, measure_options, n_weights, plan_bytes
from edgeq.quant import storage
from edgeq.quant.speed import SpeedModel, plan_seconds, speed_model, uniform_reference

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K"]
CAL = ("--calib-samples", "6", "--calib-len", "64")


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def inputs(tiny_llama):
    from edgeq.calibrate import alpaca_token_sequences, calibrate
    from edgeq.frontend import load_model
    from edgeq.quant.sensitivity import KLProbe

    ir = load_model(tiny_llama)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=6, seq_len=64)
    stats = calibrate(ir, seqs, progress=False)
    table = measure_options(ir, stats, TYPES, [0, 8], probe=KLProbe(ir, seqs[-2:]), progress=False)
    return ir, stats, table


# llama.cpp-like costs: Q4_0 / Q8_0 fast kernels, the others slower per byte, branches costly per call
SLOW_BRANCHES = SpeedModel("test", "gguf", "measured",
                           {t.name: t.bits_per_weight(32 if t.block_size is None else None) / 8 * 1e-10
                            * (1.0 if t.name in ("Q4_0", "Q8_0", "F16", "F32") else 1.3) for t in storage.types()},
                           branch_call_s=2e-7, branch_s_per_param=2e-10)


def _ratio(ir, plan, speed, budget):
    _, ref = uniform_reference(ir.hparams, TYPES, budget)
    return plan_seconds(ir.hparams, {n: type("C", (), {"type": t, "rank": 0})() for n, t in ref.items()}, speed) \
        / plan_seconds(ir.hparams, plan.tensors, speed)


@pytest.mark.parametrize("bpw", [5.0, 6.0])
def test_the_plan_meets_the_speed_floor_it_is_given(inputs, bpw):
    ir, stats, table = inputs
    budget = int(bpw * n_weights(ir) / 8)
    free = make_plan(ir, stats, "cpu-avx2", TYPES, [0, 8], budget, table=table, speed=SLOW_BRANCHES)
    r_free = _ratio(ir, free, SLOW_BRANCHES, budget)
    floors = [r_free * 1.02, r_free * 1.08]
    kls = []
    for floor in floors:
        plans = [make_plan(ir, stats, "cpu-avx2", TYPES, [0, 8], budget, table=table, speed=SLOW_BRANCHES,
                           min_speed=floor) for _ in range(2)]
        assert plans[0].tensors == plans[1].tensors  # deterministic
        p = plans[0]
        got = _ratio(ir, p, SLOW_BRANCHES, budget)  # recomputed from the plan's choices
        assert got >= floor * (1 - 1e-9), (floor, got)
        assert abs(p.summary["predicted_speed_vs_reference"] - got) <= 1e-9 * got
        assert plan_bytes(ir, p) <= budget
        assert p.tensors != free.tensors  # the floor bound: the unconstrained plan was slower
        kls.append(p.summary["predicted_kl"])
    # a tighter floor never buys a better predicted KL than the unconstrained plan
    assert min(kls) >= free.summary["predicted_kl"] * (1 - 1e-9)


def test_plan_cli_min_speed_on_the_measured_cpu_costs(tiny_llama, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"p{i}.toml"
        code, text = run_cli("plan", tiny_llama, "--bpw", "5.5", "--min-speed", "1.0", *CAL, "-o", out)
        assert code == 0, text
        assert "predicted decode" in text
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    p = Plan.load(outs[0])
    assert p.summary["min_speed"] == 1.0 and p.summary["predicted_speed_vs_reference"] >= 1.0 - 1e-9
    assert p.summary["speed_model"] == "cpu-avx2/gguf (measured)"
    from edgeq.frontend import load_model

    ir = load_model(tiny_llama)
    speed = speed_model("cpu-avx2", "gguf", 51.2)
    ref = float(p.summary["reference_ms_per_token"]) / 1e3
    assert ref / plan_seconds(ir.hparams, p.tensors, speed) >= 1.0 - 1e-6


def test_build_with_min_speed_is_deterministic_and_recorded(tiny_llama, tmp_path):
    import llama_cpp  # noqa: F401

    outs = []
    for i in range(2):
        out = tmp_path / f"a{i}"
        code, text = run_cli("build", tiny_llama, "--bpw", "5.5", "--min-speed", "0.97", *CAL, "-o", out)
        assert code == 0, text
        outs.append(out)
    for n in ("model.gguf", "plan.toml"):
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n
    m = json.loads((outs[0] / "manifest.json").read_text())
    assert json.dumps(m).count('"min_speed": 0.97') >= 1


@pytest.mark.parametrize("args, msg", [
    (("--min-speed", "0"), "--min-speed must be in (0, 4]"),
    (("--min-speed", "-1"), "--min-speed must be in"),
    (("--min-speed", "nan"), "--min-speed must be in"),
    (("--min-speed", "9"), "--min-speed must be in"),
    (("--bits", "4", "--min-speed", "0.9"), "drop --bits/--qtype/--plan"),
    (("--bpw", "5.5", "--min-speed", "4"), "no plan"),
])
def test_bad_min_speed_is_one_error_line_and_no_artifact(tiny_llama, tmp_path, args, msg):
    code, text = run_cli("build", tiny_llama, *args, *CAL, "-o", tmp_path / "x")
    assert code == 1 and msg in text, text
    assert [ln for ln in text.splitlines() if ln.startswith("error:")] and "Traceback" not in text
    assert not (tmp_path / "x").exists()
