"""`edgeq build --prune-rates` end to end on tiny models: every format, verify, run, profile."""
import json

import numpy as np
import pytest
from prune_cli import (CALIB, assert_goldens_verify_at_every_rate, assert_one_line_build_errors,
                       build_twice_identically, run_cli)

import llama_cpp  # noqa: F401


@pytest.fixture(scope="module", params=["gguf", "reference", "onnx", "tvm"])
def pruned(request, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / request.param
    if request.param == "tvm":
        import tvm  # noqa: F401
    bits = {"gguf": ["--bits", "8"], "onnx": ["--bits", "4"], "tvm": ["--bits", "4"]}.get(request.param, [])
    code, text = run_cli("build", tiny_llama, "--format", request.param, *bits, "--prune-rates", "0,0.25,0.5",
                         *CALIB, "-o", out)
    assert code == 0, text
    return out


def test_manifest_records_rates_and_what_the_format_expresses(pruned):
    m = json.loads((pruned / "manifest.json").read_text())
    p = m["prune"]
    assert p["rates"] == [0.0, 0.25, 0.5]
    assert p["expressed"] and p["dropped"]
    assert m["goldens"]["rates"] == ["0", "0.25", "0.5"]
    code, text = run_cli("inspect", pruned)
    assert code == 0 and "pruning       rates 0, 0.25, 0.5" in text, text
    if m["format"] == "gguf":
        assert set(p["files"].values()) <= set(m["files"])
        sizes = [p["bytes_per_rate"][k] for k in ("0", "0.25", "0.5")]
        assert sizes[0] > sizes[1] > sizes[2]
        assert p["storage_overhead_vs_rate0"] == pytest.approx(sum(sizes) / sizes[0])
    else:
        assert p["dropped"] == "nothing"
    if m["format"] == "onnx":
        # the default MLP form masks the pruned channels (rate 0 as fast as a 1-rate graph): every
        # rate reads every weight, and the manifest says so; the segmented form, whose rates read
        # fewer bytes, is tested in tests/backends/onnx/test_lower.py
        assert m["onnx"]["weights"]["ffn_rates"] == "mask" and "masks on the SwiGLU output" in p["expressed"]
        sizes = [p["weight_bytes_per_rate"][k] for k in ("0", "0.25", "0.5")]
        assert sizes[0] == sizes[1] == sizes[2] == m["onnx"]["weight_bytes_per_rate"]["0"] > 0
        assert m["onnx"]["rates"] == p["rates"]


def test_verify_checks_every_rate(pruned):
    assert_goldens_verify_at_every_rate(pruned)


def test_run_at_a_carried_rate_and_refuse_others(pruned):
    code, text = run_cli("run", pruned, "--prune", "0.25", "--raw", "--prompt", "hello", "--max-tokens", "4")
    assert code == 0, text
    code, text = run_cli("run", pruned, "--prune", "0.3", "--prompt", "hello")
    assert code == 1 and "not carried" in text and "0, 0.25, 0.5" in text


def test_profile_sweeps_all_rates(pruned, tmp_path):
    j = tmp_path / "p.json"
    code, text = run_cli("profile", pruned, "--prune", "all", "--runs", "1", "--max-tokens", "4", "--json", j)
    assert code == 0, text
    p = json.loads(j.read_text())
    assert [r["prune_rate"] for r in p["rates"]] == [0.0, 0.25, 0.5]
    w = [r["resident_weight_bytes"] for r in p["rates"]]
    if json.loads((pruned / "manifest.json").read_text())["format"] == "onnx":
        assert w[0] == w[1] == w[2] > 0  # masked MLP: every rate reads every weight (see above)
    else:
        assert w[0] > w[1] > w[2]


def test_reference_artifact_switches_in_place(tiny_llama, tmp_path):
    from edgeq.session import open_session

    out = tmp_path / "ref"
    code, text = run_cli("build", tiny_llama, "--format", "reference", "--prune-rates", "0,0.5", *CALIB, "-o", out)
    assert code == 0, text
    with open_session(out) as s:
        before = [b.__array_interface__["data"][0] for b in s.weight_buffers()]
        ids = s.tokenize("hello world, this is a test")
        full = s.logits(ids)
        s.set_prune_rate(0.5)
        half = s.logits(ids)
        assert [b.__array_interface__["data"][0] for b in s.weight_buffers()] == before
        assert np.abs(full - half).max() > 1e-3  # the rate really changed the model


def test_bad_prune_options_are_one_line_errors(tiny_llama, tiny_llama_lora, tmp_path):
    for args, msg in [(["--prune-rates", "0,1.5"], "rate"), (["--prune-rates", "0,abc"], "rate"),
                      (["--recover"], "--prune-rates"),
                      (["--prune-rates", "0,0.25", "--adapter", tiny_llama_lora, "--adapter-mode", "separate"],
                       "merged adapters")]:
        out = tmp_path / "o"
        code, text = run_cli("build", tiny_llama, *args, *CALIB, "-o", out)
        assert code == 1, text
        assert msg in text and "Traceback" not in text
        assert not out.exists()


def test_pruned_build_is_deterministic(tiny_qwen2, tmp_path):
    build_twice_identically(tiny_qwen2, tmp_path, "b", ["--bits", "8", "--prune-rates", "0,0.25", *CALIB])


def test_kl_recovery_build_is_deterministic(tiny_qwen2, tmp_path):
    """--recover --recover-loss kl: two builds, the same bytes; the manifest names the loss (and
    an ordinary --recover build's manifest does not)."""
    outs = build_twice_identically(tiny_qwen2, tmp_path, "k", [
        "--format", "reference", "--prune-rates", "0,0.25", *CALIB,
        "--prune-bias", "--recover", "--recover-steps", "2", "--recover-loss", "kl"])
    m = json.loads((outs[0] / "manifest.json").read_text())
    assert m["options"]["recover_loss"] == "kl"
    assert [s["config"]["loss"] for s in m["steps"] if s["name"] == "recover"] == ["kl"]
    out = tmp_path / "ce"
    code, text = run_cli("build", tiny_qwen2, "--format", "reference", "--prune-rates", "0,0.25", *CALIB,
                         "--recover", "--recover-steps", "1", "-o", out)
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    assert "recover_loss" not in m["options"]
    assert [sorted(s["config"]) for s in m["steps"] if s["name"] == "recover"] == [["data", "steps"]]


def test_bad_recover_options_are_one_line_errors(tiny_llama, tmp_path):
    assert_one_line_build_errors(tiny_llama, tmp_path, [
        (["--recover-loss", "kl"], "--recover-loss needs"),
        (["--prune-rates", "0,0.25", "--recover-loss", "kl"], "--recover-loss needs --recover"),
        (["--prune-rates", "0,0.25", "--recover", "--recover-steps", "0"], "--recover-steps"),
        (["--prune-rates", "0,0.25", "--recover", "--recover-loss", "mse"], "mse")])
