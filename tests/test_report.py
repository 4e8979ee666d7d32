"""`edgeq profile A B C --report/--markdown/--json`: one report over several artifacts (GGUF, ONNX
with pruning rates, TVM), numbers that agree with `edgeq profile --json`, plots in the HTML."""
import json
import re

import pytest
from click.testing import CliRunner

from edgeq.cli import main

import llama_cpp  # noqa: F401
import onnxruntime  # noqa: F401
import tvm  # noqa: F401
import matplotlib  # noqa: F401


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def arts(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    out = {}
    for name, args in (("gguf", ["--format", "gguf", "--bits", "8"]),
                       ("onnx", ["--format", "onnx", "--bits", "4", "--prune-rates", "0,0.25,0.5",
                                 "--calib-samples", "4", "--calib-len", "64"]),
                       ("tvm", ["--format", "tvm", "--bits", "4"])):
        code, text = run_cli("build", tiny_llama, *args, "-o", d / name)
        assert code == 0, text
        out[name] = d / name
    (d / "gguf.eval.json").write_text(json.dumps({"wikitext": {"perplexity": 123.4}}))
    return out


def test_report_over_three_formats(arts, tmp_path):
    html, md, js = tmp_path / "r.html", tmp_path / "r.md", tmp_path / "r.json"
    code, text = run_cli("profile", arts["gguf"], arts["onnx"], arts["tvm"], "--quick", "--report", html,
                         "--markdown", md, "--json", js)
    assert code == 0, text
    rep = json.loads(js.read_text())
    assert rep["schema"] == "edgeq.profile-report/1" and rep["machine"]["cores"] >= 1
    by = {a["format"]: a for a in rep["artifacts"]}
    assert set(by) == {"gguf", "onnx", "tvm"}
    # per-rate sweep for the artifact that carries rates, none for the others
    assert [r["prune_rate"] for r in by["onnx"]["rates"]] == [0.0, 0.25, 0.5] and by["tvm"]["rates"] is None
    # breakdown where the runtime allows it; llama.cpp says what is missing
    assert by["onnx"]["breakdown"]["available"] and by["tvm"]["breakdown"]["available"]
    assert not by["gguf"]["breakdown"]["available"] and "llama-cpp-python" in by["gguf"]["breakdown"]["method"]
    assert len(by["tvm"]["breakdown"]["by_layer"]) == 2
    assert by["gguf"]["quality"] == {"wikitext": {"perplexity": 123.4}}
    for a in rep["artifacts"]:
        p = a["profile"]
        assert set(p["prefill"]) == {"16", "128"} and p["roofline"]["profiles"]
        # the Markdown and HTML print the JSON's numbers
        cell = f"{a['decode_spread']['median']:.1f} [{a['decode_spread']['p25']:.1f}-{a['decode_spread']['p75']:.1f}]"
        assert cell in md.read_text() and cell in html.read_text()
    page = html.read_text()
    assert page.count("<svg") >= 4 and "Roofline on this host" in page and "Decode speed vs pruning rate" in page
    assert re.search(r"<figure>.*Per-layer breakdown", page, re.S)


def test_report_refuses_bad_input(arts, tmp_path):
    code, text = run_cli("profile", arts["tvm"], tmp_path, "--quick", "--report", tmp_path / "r.html")
    assert code == 1 and "not an artifact directory" in text
    assert not (tmp_path / "r.html").exists()
    code, text = run_cli("profile", arts["tvm"], arts["onnx"], "--prune", "0.25")
    assert code == 1 and "--prune does not apply" in text


def test_each_artifact_is_profiled_in_its_own_process(arts):
    """An artifact's peak RSS in the report is its own: profiled in a fresh process, not in one
    whose high-water mark already holds what this process (or an earlier artifact) used."""
    import numpy as np

    from edgeq.profile import peak_rss_bytes
    from edgeq.report import profile_isolated

    big = np.ones(400 * 2**20 // 8)  # 400 MiB touched here: this process's peak is at least that
    assert peak_rss_bytes() > 400 * 2**20
    prof = profile_isolated(arts["tvm"], runs=1, max_tokens=4, prefill_lengths=(16,), threads=1)
    assert prof["format"] == "tvm" and prof["decode_tok_s"] > 0
    assert prof["peak_rss_bytes"] < peak_rss_bytes() - 300 * 2**20, (prof["peak_rss_bytes"], peak_rss_bytes())
    del big
