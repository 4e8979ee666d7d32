"""`edgeq build --prune-bias / --prune-dims` end to end on tiny models: every format records how it
carries the compensation, its goldens (artifact vs the reference runtime at every rate) verify,
and bad option combinations are one-line errors."""
import json

import pytest

from prune_cli import CALIB, assert_goldens_verify_at_every_rate, assert_one_line_build_errors, run_cli

import llama_cpp  # noqa: F401


@pytest.fixture(scope="module", params=["gguf", "reference", "onnx", "tvm"])
def biased(request, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("biased") / request.param
    if request.param == "tvm":
        import tvm  # noqa: F401
    bits = {"gguf": ["--bits", "8"], "onnx": ["--bits", "4"], "tvm": ["--bits", "4"]}.get(request.param, [])
    dims = ["--prune-dims", "mlp"] if request.param in ("onnx", "gguf") else []
    code, text = run_cli("build", tiny_llama, "--format", request.param, *bits, "--prune-rates", "0,0.25,0.5",
                         "--prune-bias", *dims, *CALIB, "-o", out)
    assert code == 0, text
    return out


def test_manifest_says_how_the_format_carries_the_bias(biased):
    m = json.loads((biased / "manifest.json").read_text())
    p = m["prune"]
    assert p["rates"] == [0.0, 0.25, 0.5]
    assert "bias compensation" in p["bias"] and p["bias"] in p["expressed"]
    assert m["options"]["prune_bias"] is True
    steps = [s["name"] for s in m["steps"]]
    assert steps.index("calibrate") < steps.index("prune_bias") < steps.index("sort")
    assert "prune_bias" in [h["name"] for h in m["history"]]
    if m["format"] in ("onnx", "gguf"):
        assert m["options"]["prune_dims"] == "mlp"
        widths = p["widths"]["0.5"]
        assert all(w["qk_pairs"] == 8 and w["v_dims"] == 16 for w in widths)  # tiny: head_dim 16
        assert (p.get("dims") or p["planned"].get("dims")) == "mlp"


def test_goldens_verify_at_every_rate(biased):
    assert_goldens_verify_at_every_rate(biased)


def test_default_build_is_unchanged(tiny_llama, tmp_path):
    """Without the new options the manifest's options and steps are what they were."""
    out = tmp_path / "plain"
    code, text = run_cli("build", tiny_llama, "--format", "reference", "--prune-rates", "0,0.25", *CALIB, "-o", out)
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    assert "prune_bias" not in m["options"] and "prune_dims" not in m["options"]
    assert "prune_bias" not in [s["name"] for s in m["steps"]] and "bias" not in m["prune"]
    assert "dims" not in [k for s in m["steps"] if s["name"] == "rate_plan" for k in s["config"]]


def test_bad_option_combinations_are_one_line_errors(tiny_llama, tmp_path):
    assert_one_line_build_errors(tiny_llama, tmp_path, [
        (["--prune-bias"], "--prune-bias needs --prune-rates"),
        (["--prune-dims", "mlp"], "--prune-dims needs --prune-rates"),
        (["--prune-rates", "0", "--prune-bias"], "--prune-bias needs --prune-rates"),
        (["--prune-rates", "0,0.25", "--prune-dims", "qk"], "qk"),
        (["--prune-rates", "0,0.7", "--prune-dims", "mlp"], "MLP alone")])
