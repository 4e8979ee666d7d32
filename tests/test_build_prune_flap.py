"""`edgeq build --sort flap --importance fluctuation --prune-dims mlp --prune-bias` end to end on a
tiny model (FLAP: fluctuation metric, its allocation across layers, bias compensation): the
manifest records it, the widths are MLP-only, nested and on the rate's budget, the goldens verify
at every rate, and bad combinations are one-line errors with no artifact left behind."""
import json

import pytest

from edgeq.frontend import load_model
from edgeq.ir import PruneSpec
from prune_cli import (CALIB, assert_goldens_verify_at_every_rate, assert_mlp_only_nested_on_budget,
                       assert_one_line_build_errors, run_cli)


@pytest.fixture(scope="module")
def flap(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("flap") / "gguf"
    code, text = run_cli("build", tiny_llama, "--bits", "8", "--prune-rates", "0,0.25,0.5", "--prune-dims", "mlp",
                         "--prune-bias", "--sort", "flap", "--importance", "fluctuation", *CALIB, "-o", out)
    assert code == 0, text
    return out


def test_manifest_records_flap(flap, tiny_llama):
    m = json.loads((flap / "manifest.json").read_text())
    assert m["options"]["sort"] == "flap" and m["options"]["importance"] == "fluctuation"
    assert m["options"]["prune_dims"] == "mlp" and m["options"]["prune_bias"] is True
    assert next(s for s in m["steps"] if s["name"] == "sort")["config"]["method"] == "flap"
    step = next(s for s in m["steps"] if s["name"] == "rate_plan")
    assert step["config"]["importance"] == "fluctuation" and "probe_samples" not in step["config"]
    names = [h["name"] for h in m["history"]]
    assert names.index("prune_bias") < names.index("sort_flap") < names.index("sort_qk") < names.index("rate_plan")
    assert next(h for h in m["history"] if h["name"] == "rate_plan")["options"]["importance"] == "fluctuation"
    spec = PruneSpec.from_json(m["prune"])  # (the GGUF manifest's widths; the allocation is in the history)
    hp = load_model(tiny_llama).hparams
    assert_mlp_only_nested_on_budget(spec, hp, qk_pairs=hp.head_dim // 2, v_dims=hp.head_dim)


def test_goldens_verify_at_every_rate(flap):
    assert_goldens_verify_at_every_rate(flap)


def test_flap_sort_alone_prunes_every_dimension(tiny_llama, tmp_path):
    """--sort flap with the default allocation (angular, all dimensions): V/O components by their
    fluctuation, Q/K pairs by UniQL's score."""
    out = tmp_path / "ref"
    code, text = run_cli("build", tiny_llama, "--format", "reference", "--prune-rates", "0,0.25", "--sort", "flap",
                         *CALIB, "-o", out)
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    assert m["options"]["sort"] == "flap" and m["options"]["importance"] == "angular"
    ws = PruneSpec.from_json(m["prune"]).widths[0.25]
    assert any(w.v_dims < 16 for w in ws) and any(w.qk_pairs < 8 for w in ws)  # tiny: head_dim 16


def test_bad_option_combinations_are_one_line_errors(tiny_llama, tmp_path):
    assert_one_line_build_errors(tiny_llama, tmp_path, [
        (["--prune-rates", "0,0.25", "--importance", "fluctuation", "--sort", "flap"], "add --prune-dims mlp"),
        (["--prune-rates", "0,0.25", "--importance", "fluctuation", "--prune-dims", "mlp"], "add --sort flap"),
        (["--prune-rates", "0,0.25", "--importance", "fluctuation", "--prune-dims", "mlp", "--sort", "naive"],
         "add --sort flap"),
        (["--prune-rates", "0,0.25", "--sort", "flapp"], "flapp")])
