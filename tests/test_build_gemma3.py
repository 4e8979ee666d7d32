"""Gemma 3 through `edgeq build` / `verify` / `run` on the tiny random checkpoint: GGUF, ONNX, TVM
and the reference format build and verify; planned GGUF builds (calibration, KL probe, GPTQ,
compensation branches in llama.cpp) verify and are deterministic; structured pruning of the MLP
channels builds and verifies in the reference, ONNX and TVM formats, and in GGUF with one MLP width
for every layer at each rate (llama.cpp's gemma3 has one n_ff), while a per-rate ffn_down bias
(--prune-bias), which llama.cpp's gemma3 does not load, is refused with one `error:` line and
leaves nothing behind."""
import json

import pytest
from click.testing import CliRunner

from edgeq.cli import main

import llama_cpp  # noqa: F401


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


@pytest.mark.parametrize("fmt, bits", [("gguf", 8), ("gguf", 4), ("reference", None), ("onnx", 4), ("onnx", 32),
                                       ("tvm", 4)])
def test_build_verify_run(tiny_gemma3, tmp_path, fmt, bits):
    out = tmp_path / f"{fmt}{bits}"
    code, text = run_cli("build", tiny_gemma3, "--format", fmt, *(["--bits", bits] if bits else []), "-o", out)
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    assert m["hparams"]["arch"] == "gemma3" and m["hparams"]["sliding_window"] == 8
    code, text = run_cli("verify", out)
    assert code == 0 and "OK" in text, text
    code, text = run_cli("run", out, "--prompt", "Once upon a time", "--max-tokens", "4")
    assert code == 0, text


@pytest.mark.parametrize("args, words", [
    (["--format", "gguf", "--bits", "8", "--prune-rates", "0,0.25", "--prune-dims", "mlp", "--prune-bias"],
     "per-rate bias compensation (--prune-bias) in the gguf format cannot express gemma3 models: llama.cpp's "
     "gemma3 architecture creates every layer's MLP at layer 0's width (n_ff(0))"),
    (["--format", "reference", "--prune-rates", "0,0.25", "--calib-samples", "4", "--calib-len", "32"],
     "Q/K pairs under QK-norm are exempt from pruning"),
])
def test_unsupported_paths_refuse_with_one_line(tiny_gemma3, tmp_path, args, words):
    out = tmp_path / "o"
    code, text = run_cli("build", tiny_gemma3, *args, "-o", out)
    assert code != 0
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], text
    assert "Traceback" not in text and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


# ---- planned builds (calibration, the planner's KL probe, GPTQ, compensation) ----------------------

CAL = ("--calib-samples", "6", "--calib-len", "64")  # 64 tokens: 8 x the tiny model's sliding window


def test_planned_build_verifies_and_is_deterministic(tiny_gemma3, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"p{i}"
        code, text = run_cli("build", tiny_gemma3, "--bpw", "5.5", *CAL, "-o", out)
        assert code == 0, text
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert {"model.gguf", "plan.toml", "manifest.json"} <= set(names)
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n
    m = json.loads((outs[0] / "manifest.json").read_text())
    assert m["hparams"]["arch"] == "gemma3" and m["plan_file"] == "plan.toml"
    assert len({t for n, t in m["tensor_types"].items() if n.startswith("blk.")}) > 1  # a real mix
    code, text = run_cli("verify", outs[0])
    assert code == 0 and "OK" in text, text
    # the plan replays the same artifact
    code, text = run_cli("build", tiny_gemma3, "--plan", outs[0] / "plan.toml", *CAL, "-o", tmp_path / "replay")
    assert code == 0, text
    assert (tmp_path / "replay" / "model.gguf").read_bytes() == (outs[0] / "model.gguf").read_bytes()


def test_compensation_branches_bring_llama_cpp_closer_to_fp32(tiny_gemma3, tmp_path):
    """Q4_0 everywhere with and without rank-16 QERA branches (shipped as a LoRA GGUF that
    llama.cpp's gemma3 graph applies): KL vs the fp32 reference must drop with them."""
    from edgeq.plan import Choice, Plan
    from edgeq.verify import verify

    code, text = run_cli("plan", tiny_gemma3, "--target", "cpu-avx2", "--bpw", "5.5", *CAL, "-o", tmp_path / "p.toml")
    assert code == 0, text
    base = Plan.load(tmp_path / "p.toml")
    kl = {}
    for rank in (0, 16):
        p = Plan(target=base.target, tensors={n: Choice("Q4_0", rank if n.startswith("blk.") else 0)
                                              if n != "token_embd" else Choice("Q8_0") for n in base.tensors})
        out = tmp_path / f"comp{rank}"
        code, text = run_cli("build", tiny_gemma3, "--plan", p.save(tmp_path / f"r{rank}.toml"), *CAL, "-o", out)
        assert code == 0, text
        m = json.loads((out / "manifest.json").read_text())
        assert ("compensation.gguf" in m["adapter_files"]) == (rank > 0)
        rep = verify(out)
        assert rep.ok, rep.problems
        kl[rank] = rep.reference["0"]["mean_kl"]
    assert kl[16] < kl[0], kl


@pytest.mark.parametrize("sort", ["uniql", "naive", "flap"])
def test_mlp_pruning_in_the_reference_format(tiny_gemma3, tmp_path, sort):
    """--prune-dims mlp: the sorts are exact (rate 0 = transformers' model), Q/K pairs stay whole
    (exempt under QK-norm, said in the manifest), the rates cut the GeGLU channels and verify."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from edgeq.session import open_session

    out = tmp_path / sort
    code, text = run_cli("build", tiny_gemma3, "--format", "reference", "--prune-rates", "0,0.25", "--prune-dims",
                         "mlp", "--prune-bias", "--sort", sort, *CAL, "-o", out)
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    pr = m["prune"]
    assert pr["dims"] == "mlp" and "Q/K RoPE pairs are exempt" in pr["expressed"]
    hp = m["hparams"]
    w25 = pr["widths"]["0.25"]
    assert all(w["qk_pairs"] == hp["head_dim"] // 2 and w["v_dims"] == hp["head_dim"] for w in w25)
    assert sum(w["ffn"] for w in w25) < 0.9 * hp["intermediate_size"] * hp["num_layers"]
    code, text = run_cli("verify", out)
    assert code == 0 and "OK" in text, text
    ids = np.random.RandomState(0).randint(0, hp["vocab_size"], 40).tolist()
    hf = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    rel = {}
    for rate in (0.0, 0.25):
        with open_session(out, n_ctx=64, prune=rate) as s:
            rel[rate] = float(np.abs(s.logits(ids) - want).max() / np.abs(want).max())
    assert rel[0.0] <= 1e-5 and rel[0.25] > 1e-3, rel


@pytest.mark.parametrize("fmt", ["onnx", "tvm"])
def test_mlp_pruning_in_onnx_and_tvm(tiny_gemma3, tmp_path, fmt):
    """--prune-dims mlp --prune-bias: one artifact carries both rates (switched at run time); its
    manifest says Q/K pairs are exempt and nothing is dropped; verify checks the goldens of every
    rate (the artifact at each rate against the float reference at that rate)."""
    out = tmp_path / fmt
    code, text = run_cli("build", tiny_gemma3, "--format", fmt, "--bits", "4", "--prune-rates", "0,0.25",
                         "--prune-dims", "mlp", "--prune-bias", *CAL, "-o", out)
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    pr = m["prune"]
    assert pr["rates"] == [0.0, 0.25] and pr["dims"] == "mlp" and pr["dropped"] == "nothing"
    assert "Q/K RoPE pairs are exempt" in pr["expressed"] and "bias compensation" in pr["expressed"]
    assert sorted(json.loads((out / "goldens.json").read_text())["rates"]) == ["0", "0.25"]
    code, text = run_cli("verify", out)
    assert code == 0 and "OK" in text, text
    code, text = run_cli("run", out, "--prompt", "Once upon a time", "--max-tokens", "4", "--prune", "0.25")
    assert code == 0, text


def test_mlp_pruning_in_gguf_is_one_width_per_rate(tiny_gemma3, tmp_path):
    """GGUF: one file per rate in llama.cpp's own gemma3 architecture (gguf-py reads it back), every
    layer at one MLP width per rate (the mean of the planned per-layer widths, to the granularity),
    which the manifest states; verify runs llama.cpp on each rate file against the float reference
    at that rate's widths."""
    import gguf

    out = tmp_path / "g"
    code, text = run_cli("build", tiny_gemma3, "--format", "gguf", "--bits", "8", "--prune-rates", "0,0.25",
                         "--prune-dims", "mlp", *CAL, "-o", out)
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    pr, hp = m["prune"], m["hparams"]
    planned = [w["ffn"] for w in pr["planned"]["widths"]["0.25"]]
    g = pr["granularity"]
    want = min(hp["intermediate_size"], max(g, g * int(sum(planned) / len(planned) / g + 0.5)))
    assert "one MLP width for every layer" in pr["expressed"] and "per-layer MLP allocation" in pr["dropped"]
    for rate, width in (("0", hp["intermediate_size"]), ("0.25", want)):
        assert [w["ffn"] for w in pr["widths"][rate]] == [width] * hp["num_layers"]
        r = gguf.GGUFReader(out / pr["files"][rate])
        assert bytes(r.fields["general.architecture"].parts[-1]).decode() == "gemma3"
        assert int(r.fields["gemma3.feed_forward_length"].parts[-1][0]) == width
        shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}  # ggml order: (in, out)
        for layer in range(hp["num_layers"]):
            assert shapes[f"blk.{layer}.ffn_up.weight"] == [hp["hidden_size"], width]
            assert shapes[f"blk.{layer}.ffn_down.weight"] == [width, hp["hidden_size"]]
    assert want < hp["intermediate_size"]
    code, text = run_cli("verify", out)
    assert code == 0 and "OK" in text and "rate 0.25:" in text, text
