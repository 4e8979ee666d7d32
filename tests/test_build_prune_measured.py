"""`edgeq build --importance measured --prune-dims mlp` end to end on a tiny model: the manifest
records the measured allocation (options, step, what was measured), the widths are MLP-only,
nested and on the rate's budget, the goldens verify at every rate, and bad combinations are
one-line errors with no artifact left behind."""
import json

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.frontend import load_model
from edgeq.ir import PruneSpec
from edgeq.passes.rate_plan import rate_tolerance, realised_rate

CALIB = ["--calib-samples", "4", "--calib-len", "64"]


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


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
    prev = None
    for r in spec.rates:
        ws = spec.widths[r]
        assert all(w.qk_pairs == 8 and w.v_dims == 16 for w in ws)  # tiny: head_dim 16; MLP only
        assert abs(realised_rate(hp, ws) - r) <= rate_tolerance(hp, spec.granularity) / 2 + 1e-12
        if prev is not None:
            assert all(a.ffn <= b.ffn for a, b in zip(ws, prev))
        prev = ws


def test_goldens_verify_at_every_rate(measured):
    code, text = run_cli("verify", measured)
    assert code == 0, text
    assert text.count("regression vs recorded goldens") == 3


def test_bad_option_combinations_are_one_line_errors(tiny_llama, tmp_path):
    for args, msg in [(["--prune-rates", "0,0.25", "--importance", "measured"], "add --prune-dims mlp"),
                      (["--prune-rates", "0,0.25", "--importance", "measured", "--prune-dims", "all"],
                       "add --prune-dims mlp"),
                      (["--prune-rates", "0,0.25", "--importance", "sensed", "--prune-dims", "mlp"], "sensed")]:
        out = tmp_path / "o"
        code, text = run_cli("build", tiny_llama, "--format", "reference", *args, *CALIB, "-o", out)
        assert code != 0, (args, text)
        assert msg in text and "Traceback" not in text, (args, text)
        assert sum(line.lower().startswith("error") for line in text.splitlines()) == 1, text
        assert not out.exists()
