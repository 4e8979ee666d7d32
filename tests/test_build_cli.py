"""End-to-end through the CLI on tiny models: build, verify, tamper, bad inputs, determinism."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main

import llama_cpp  # noqa: F401


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "q8"
    code, text = run_cli("build", tiny_llama, "--target", "cpu-avx2", "--bits", "8", "-o", out)
    assert code == 0, text
    return out


def test_build_writes_manifest_with_hashes_and_goldens(built, tiny_llama):
    m = json.loads((built / "manifest.json").read_text())
    assert m["format"] == "gguf" and m["target"] == "cpu-avx2" and m["weight_type"] == "Q8_0"
    assert set(m["files"]) == {"model.gguf", "goldens.json"}
    assert m["source"]["files"]["model.safetensors"]
    assert m["schema_version"] == 1 and m["edgeq_version"]
    assert m["goldens"]["positions"] > 0


def test_verify_passes_on_a_fresh_artifact(built):
    code, text = run_cli("verify", built)
    assert code == 0, text
    assert "OK" in text


def test_verify_catches_a_tampered_model_file(built, tmp_path):
    art = tmp_path / "a"
    shutil.copytree(built, art)
    f = art / "model.gguf"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    code, text = run_cli("verify", art)
    assert code == 1
    assert "model.gguf: sha256 mismatch" in text


def test_verify_catches_a_changed_golden_even_with_rehashed_manifest(built, tmp_path):
    from edgeq.artifact import read_manifest, write_manifest

    art = tmp_path / "a"
    shutil.copytree(built, art)
    g = json.loads((art / "goldens.json").read_text())
    first = g["rates"]["0"]["artifact"]["topk_ids"][0][3]
    first[0], first[1] = first[1], first[0]  # a different top-1 at one position
    (art / "goldens.json").write_text(json.dumps(g))
    code, text = run_cli("verify", art)
    assert code == 1 and "goldens.json: s" in text  # hash (or size) mismatch first
    m = read_manifest(art)
    m.pop("files")
    write_manifest(art, m)  # an attacker / bad tool also re-hashed: the rerun still catches it
    code, text = run_cli("verify", art)
    assert code == 1 and "regression: top-1 agreement" in text


def test_build_is_deterministic(tiny_llama, tiny_llama_lora, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"b{i}"
        code, text = run_cli("build", tiny_llama, "--adapter", tiny_llama_lora, "--adapter-mode", "separate",
                             "--bits", "4", "-o", out)
        assert code == 0, text
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    assert any(n.startswith("adapter-") for n in names)
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n


def test_separate_adapter_artifact_verifies(tiny_qwen2, tiny_qwen2_lora, tmp_path):
    out = tmp_path / "sep"
    code, text = run_cli("build", tiny_qwen2, "--adapter", tiny_qwen2_lora, "--adapter-mode", "separate",
                         "--bits", "8", "-o", out)
    assert code == 0, text
    code, text = run_cli("verify", out)
    assert code == 0, text


@pytest.mark.parametrize("case", ["unknown-target", "truncated", "other-base", "unknown-arch", "missing-model",
                                  "bad-bits"])
def test_bad_input_gives_one_line_error_and_no_output(case, tiny_llama, tiny_qwen2_lora, tmp_path):
    model, extra = tiny_llama, []
    if case == "unknown-target":
        extra = ["--target", "cpu-quantum"]
    elif case == "truncated":
        model = tmp_path / "m"
        shutil.copytree(tiny_llama, model)
        f = model / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif case == "other-base":
        extra = ["--adapter", tiny_qwen2_lora]
    elif case == "unknown-arch":
        model = tmp_path / "m"
        shutil.copytree(tiny_llama, model)
        cfg = json.loads((model / "config.json").read_text())
        cfg["model_type"] = "gpt_neox"
        (model / "config.json").write_text(json.dumps(cfg))
    elif case == "missing-model":
        model = tmp_path / "nope"
    elif case == "bad-bits":
        extra = ["--bits", "3"]
    out = tmp_path / "out"
    code, text = run_cli("build", model, *extra, "-o", out)
    assert code == 1
    lines = [l for l in text.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []


def test_failure_inside_the_build_leaves_no_partial_artifact(tiny_llama, tmp_path, monkeypatch):
    import edgeq.pipeline.steps

    def boom(*a, **k):
        raise edgeq.pipeline.steps.EdgeqError("simulated failure while recording goldens")

    monkeypatch.setattr(edgeq.pipeline.steps, "record_goldens", boom)
    out = tmp_path / "out"
    code, text = run_cli("build", tiny_llama, "-o", out)
    assert code == 1 and "simulated failure" in text
    assert not out.exists() and leftovers(tmp_path, "out") == []


def test_existing_output_needs_force(built, tiny_llama):
    code, text = run_cli("build", tiny_llama, "-o", built)
    assert code == 1 and "--force" in text


def test_inspect_lists_tensor_types(built):
    code, text = run_cli("inspect", built, "--tensors")
    assert code == 0
    assert "blk.0.attn_q.weight" in text and "Q8_0" in text


def test_profile_json(built, tmp_path):
    j = tmp_path / "p.json"
    code, text = run_cli("profile", built, "--runs", "1", "--max-tokens", "8", "--json", j)
    assert code == 0, text
    p = json.loads(j.read_text())
    assert p["decode_tok_s"] > 0 and p["ttft_s"] > 0 and p["peak_rss_bytes"] > 0
    assert set(p["prefill"]) == {"128", "512"}
    r = p["roofline"]  # predicted speed on every profile, and on this host vs the measurement
    assert {x["profile"] for x in r["profiles"]} >= {"cpu-avx2", "gpu-t4", "mobile-arm64"}
    assert r["token_cost"]["weight_bytes"] == p["resident_weight_bytes"]
    h = r["host"]
    assert h["measured_decode_tok_s"] == p["decode_tok_s"]
    assert h["decode_fraction_of_roofline"] == pytest.approx(p["decode_tok_s"] / h["predicted"]["decode_tok_s"])
    assert "roofline (this host)" in text


def test_run_streams_tokens(built):
    code, text = run_cli("run", built, "--prompt", "hello", "--max-tokens", "5", "--raw")
    assert code == 0, text


def test_verify_on_a_non_artifact_is_a_clean_error(tmp_path):
    code, text = run_cli("verify", tmp_path)
    assert code == 1 and "no manifest.json" in text


def test_targets_table_lists_every_profile():
    code, text = run_cli("targets")
    assert code == 0
    for name in ("cpu-avx2", "cpu-avx512", "mobile-arm64", "gpu-t4", "gpu-rtx3060", "gpu-rtx4090-laptop"):
        assert name in text


def _reference_text(model_dir, prompt, n):
    from edgeq.frontend import load_model
    from runtimes.reference import ReferenceSession

    s = ReferenceSession(load_model(model_dir))
    ids = s.tokenize(prompt)
    toks = list(s.generate_ids(ids, n, stop_at_eos=False))
    return toks, "".join(s.generate(prompt, max_tokens=n, stop_at_eos=False))


@pytest.mark.parametrize("fmt", ["reference", "gguf-q8"])
def test_run_prints_the_reference_greedy_text(fmt, built, tiny_llama, tmp_path):
    """`edgeq run --raw` (greedy) prints what the fp32 reference generates for the same prompt."""
    art = built
    if fmt == "reference":
        art = tmp_path / "ref"
        code, text = run_cli("build", tiny_llama, "--format", "reference", "--no-goldens", "-o", art)
        assert code == 0, text
    prompt, n = "hello world", 8
    r = CliRunner().invoke(main, ["run", str(art), "--prompt", prompt, "--raw", "--max-tokens", str(n)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    toks, want = _reference_text(tiny_llama, prompt, n)
    assert len(set(toks)) > 1  # not a degenerate repeat of one token
    assert r.stdout.rstrip("\n") == want


def _kl(p_logits, q_logits):
    """Mean KL(softmax p || softmax q) over positions, nats."""
    from edgeq.goldens import log_softmax

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def test_separate_lora_artifact_matches_merged_and_the_reference(tiny_qwen2, tiny_qwen2_lora, tmp_path):
    """A separate-LoRA artifact runs like the merged one and like the fp32 reference with the
    adapter merged, and unlike the base model (so the adapter file is really applied)."""
    from edgeq.frontend import load_adapter, load_model, merge_adapters
    from edgeq.session import open_session
    from runtimes.reference import ReferenceSession

    arts = {}
    for mode in ("separate", "merge"):
        arts[mode] = tmp_path / mode
        code, text = run_cli("build", tiny_qwen2, "--adapter", tiny_qwen2_lora, "--adapter-mode", mode,
                             "--bits", "8", "--no-goldens", "-o", arts[mode])
        assert code == 0, text
    base = load_model(tiny_qwen2)
    ref = ReferenceSession(merge_adapters(load_adapter(base, tiny_qwen2_lora)))
    ids = ref.tokenize("The quick brown fox jumps over the lazy dog, again and again.")
    want = ref.logits(ids)
    got = {}
    for mode, art in arts.items():
        with open_session(art, n_ctx=128) as s:
            got[mode] = s.logits(ids)
    kl_sep, kl_merge = _kl(want, got["separate"]), _kl(want, got["merge"])
    kl_base = _kl(want, ReferenceSession(base).logits(ids))
    print(f"KL vs reference: separate {kl_sep:.2e}, merged {kl_merge:.2e}, base (no adapter) {kl_base:.2e}")
    assert kl_base > 20 * max(kl_sep, kl_merge)  # the adapter's effect is far above the Q8 error
    assert kl_sep < SEPARATE_LORA_MAX_KL and kl_merge < SEPARATE_LORA_MAX_KL
    assert _kl(got["merge"], got["separate"]) < SEPARATE_LORA_MAX_KL


SEPARATE_LORA_MAX_KL = 1e-3  # Q8_0 on the tiny model: ~1e-4 (the adapter itself: ~4e-2)
