"""`edgeq build --importance measured --prune-dims mlp` end to end on a tiny model: the manifest
records the measured allocation (options, step, what was measured), the widths are MLP-only,
nested and on the rate's budget, the goldens verify at every rate, and bad combinations are
one-line errors with no artifact left behind."""
import json

import pytest

from edgeq.frontend import load_model
from edgeq.ir import PruneSpec
from prune_cli import (CALIB, assert_goldens_verify_at_every_rate, assert_mlp_only_nested_on_budget,
                       assert_one_line_build_errors, run_cli)


@pytest.fixture(scope="module")
def measured(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("measured") / "gguf"
    code, text = run_cli("build", tiny_llama, "--bits", "8", "--prune-rates", "0,0.25,0.5", "--prune-dims", "mlp",
                         "--prune-bias", "--importance", "measured", *CALIB, "-o", out)
    assert code == 0, text
    return out


def test_manifest_records_the_measured_allocation(measured, tiny_llama):
    m = json.loads((measured / "manifest.json").read_text())
    assert m["options"]["importance"] == "measured" and m["options"]["prune_dims"] == "mlp"
    step = next(s for s in m["steps"] if s["name"] == "rate_plan")
    assert step["config"]["importance"] == "measured" and step["config"]["probe_samples"] == 4
    assert next(s for s in m["steps"] if s["name"] == "check_memory")["config"]["measured"] is True
    rec = next(h for h in m["history"] if h["name"] == "rate_plan")["options"]
    assert rec["importance"] == "measured"
    meas = rec["measured"]
    assert meas["probe_sequences"] == 4 and meas["probe_tokens"] == 4 * 64
    assert len(meas["probe_kl"]) == 2 and all(len(r) == len(meas["probe_widths"]) for r in meas["probe_kl"])
    assert all(k > 0 for r in meas["probe_kl"] for k in r)
    p = m["prune"]
    spec = PruneSpec.from_json({**p, "dims": "mlp"})
    hp = load_model(tiny_llama).hparams
    assert_mlp_only_nested_on_budget(spec, hp, qk_pairs=8, v_dims=16)  # tiny: head_dim 16


def test_goldens_verify_at_every_rate(measured):
    assert_goldens_verify_at_every_rate(measured)


def test_bad_option_combinations_are_one_line_errors(tiny_llama, tmp_path):
    assert_one_line_build_errors(tiny_llama, tmp_path, [
        (["--prune-rates", "0,0.25", "--importance", "measured"], "add --prune-dims mlp"),
        (["--prune-rates", "0,0.25", "--importance", "measured", "--prune-dims", "all"], "add --prune-dims mlp"),
        (["--prune-rates", "0,0.25", "--importance", "sensed", "--prune-dims", "mlp"], "sensed")])
