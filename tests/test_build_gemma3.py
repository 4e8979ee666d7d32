"""Gemma 3 through `edgeq build` / `verify` / `run` on the tiny random checkpoint: GGUF, ONNX, TVM
and the reference format build and verify; formats and passes that implement only the Llama forward
refuse with one `error:` line and leave nothing behind."""
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
    (["--format", "gguf"], "calibration (planned builds, pruning, edgeq plan) does not support gemma3"),
    (["--format", "gguf", "--bits", "8", "--prune-rates", "0,0.25"], "does not support gemma3"),
    (["--format", "onnx", "--bits", "4", "--prune-rates", "0,0.25"], "does not support gemma3"),
])
def test_unsupported_paths_refuse_with_one_line(tiny_gemma3, tmp_path, args, words):
    out = tmp_path / "o"
    code, text = run_cli("build", tiny_gemma3, *args, "-o", out)
    assert code != 0
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], text
    assert "Traceback" not in text and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
