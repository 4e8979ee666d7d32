"""onnxruntime runtime: built artifacts, LoRA switching at run time, no-torch import, bad input."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnx  # noqa: F401
import onnxruntime  # noqa: F401

from edgeq.build import BuildOptions, build  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.frontend import load_adapter, load_model  # noqa: E402
from edgeq.session import open_session  # noqa: E402
from runtimes.onnxrt import OnnxSession  # noqa: E402
from runtimes.reference import ReferenceSession  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _build(model, out, **kw):
    return build(BuildOptions(model=model, out=out, format="onnx", **kw), log=lambda m: None)


@pytest.fixture(scope="module")
def lora_art(tiny_llama, tiny_llama_lora, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "lora"
    _build(tiny_llama, out, bits=32, adapters=(tiny_llama_lora,), adapter_mode="separate")
    return out


def test_separate_adapter_on_off_and_switch_match_reference(lora_art, tiny_llama, tiny_llama_lora):
    ir = load_adapter(load_model(tiny_llama), tiny_llama_lora)
    ids = list(range(3, 40, 2))
    with_lora = ReferenceSession(ir, dtype=np.float64).logits(ids)
    base = ReferenceSession(ir.without_low_rank(), dtype=np.float64).logits(ids)
    tol = 1e-4 * np.abs(with_lora).max()
    s = open_session(lora_art)
    (name,) = s.adapters
    assert s.active_adapters == (name,)  # as built: the adapter is on
    np.testing.assert_allclose(s.logits(ids), with_lora, rtol=0, atol=tol)
    s.set_adapter(None)
    np.testing.assert_allclose(s.logits(ids), base, rtol=0, atol=tol)
    assert np.abs(base - with_lora).max() > 100 * tol  # the adapter does change the outputs
    s.set_adapter(name)
    np.testing.assert_allclose(s.logits(ids), with_lora, rtol=0, atol=tol)
    with pytest.raises(EdgeqError, match="not in this artifact"):
        s.set_adapter("other")


def test_adapter_file_holds_only_the_branches(lora_art):
    import onnxruntime as ort

    (f,) = [p for p in lora_art.iterdir() if p.suffix == ".onnx_adapter"]
    params = ort.AdapterFormat.read_adapter(str(f)).get_parameters()
    assert params and all(k.startswith("lora.") and k[-2:] in (".a", ".b") for k in params)


def test_built_artifact_verifies_and_generates(tiny_qwen2, tmp_path):
    from edgeq.verify import verify

    res = _build(tiny_qwen2, tmp_path / "q4", bits=4)
    m = res.manifest
    assert m["format"] == "onnx" and m["weight_type"] == "INT4" and m["onnx"]["weights"]["accuracy_level"] == 4
    assert set(m["files"]) == {"model.onnx", "model.onnx.data", "tokenizer.spec.json", "goldens.json"}
    rep = verify(tmp_path / "q4")
    assert rep.ok, rep.problems
    with open_session(tmp_path / "q4") as s:
        ids = s.tokenize("hello world")
        got = list(s.generate_ids(ids, 5, stop_at_eos=False))
        text = "".join(s.generate("hello world", max_tokens=5, stop_at_eos=False))
        assert s.last_stats.new_tokens == 5
    # greedy tokens and text against the fp32 reference of the same model (INT4: the first
    # tokens of a greedy run agree on this model; the text is the detokenized tokens)
    ref = ReferenceSession(load_model(tiny_qwen2))
    want = list(ref.generate_ids(ids, 5, stop_at_eos=False))
    assert got[:2] == want[:2], (got, want)
    assert text == ref.detokenize(got) and len(text) > 0


def test_gpu_profiles_default_to_onnx_with_their_group(tiny_llama, tmp_path):
    res = build(BuildOptions(model=tiny_llama, out=tmp_path / "g", target="gpu-t4", format=None, record_goldens=False),
                log=lambda m: None)
    m = res.manifest
    assert m["format"] == "onnx" and m["onnx"]["weights"]["linear"] == "int4_g128_sym"
    assert m["onnx"]["weights"]["accuracy_level"] == 0
    # a width that 128 does not divide falls back to the largest group that does
    widths = {k: v for k, v in m["onnx"]["tensor_formats"].items()}
    assert all(v.startswith("int4_g") or k == "token_embd" or k == "output" for k, v in widths.items())


def test_bad_inputs_fail_cleanly(lora_art, tiny_llama, tmp_path):
    import shutil

    with pytest.raises(EdgeqError, match="not carried"):
        open_session(lora_art, prune=0.25)
    with pytest.raises(EdgeqError, match="onnxruntime runtime only"):
        open_session(lora_art, runtime="llamacpp")
    with pytest.raises(EdgeqError, match="--bits 4, 8 or 32"):
        _build(tiny_llama, tmp_path / "x", bits=16)
    with pytest.raises(EdgeqError, match="--qtype names a GGUF type"):
        _build(tiny_llama, tmp_path / "y", qtype="Q4_0")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    bad = tmp_path / "bad"
    shutil.copytree(lora_art, bad)
    (f,) = [p for p in bad.iterdir() if p.suffix == ".onnx_adapter"]
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(EdgeqError, match="adapter file"):
        OnnxSession(bad)
    trunc = tmp_path / "trunc"
    shutil.copytree(lora_art, trunc)
    data = trunc / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(EdgeqError, match="cannot load"):
        OnnxSession(trunc)
    with open_session(lora_art) as s:
        with pytest.raises(EdgeqError, match="out of range"):
            s.logits([10 ** 6])
        with pytest.raises(EdgeqError, match="empty"):
            s.logits([])


def test_runtime_works_without_torch(lora_art):
    """Device side: open, switch the adapter and generate with torch/transformers unimportable."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from edgeq.session import open_session\n"
            f"s = open_session({str(lora_art)!r}, n_ctx=64)\n"
            "out = ''.join(s.generate('hello', max_tokens=4, stop_at_eos=False))\n"
            "s.set_adapter(None)\n"
            "assert s.logits(s.tokenize('hello')).shape[0] > 0\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cli_run_profile_eval_work_on_onnx(lora_art, tmp_path):
    import json

    from click.testing import CliRunner

    from edgeq.cli import main

    def cli(*args):
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    assert "onnxruntime" in cli("run", lora_art, "--raw", "--prompt", "hello", "--max-tokens", "4")
    sampled = [cli("run", lora_art, "--raw", "--prompt", "hello", "--max-tokens", "12", "--temperature", "1.5",
                   "--seed", str(seed)).rsplit("\n[", 1)[0] for seed in (1, 1, 2)]  # text, not timings
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # seeded sampling is reproducible
    cli("profile", lora_art, "--runs", "1", "--json", tmp_path / "p.json")
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["format"] == "onnx" and p["runtime"] == "onnxruntime" and p["decode_tok_s"] > 0
    assert p["resident_weight_bytes"] == (lora_art / "model.onnx.data").stat().st_size + (
        lora_art / "model.onnx").stat().st_size
    cli("eval", lora_art, "--tasks", "wikitext,kl", "--limit", "64", "--json", tmp_path / "e.json")
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["kl"]["mean_kl"] < 1e-6  # float32 weights + the adapter: the reference model itself
