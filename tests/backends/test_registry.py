"""The backend registry (edgeq.backends): every format registered once, lookups, and each backend's
option checks, target defaults, runtimes and runs_here."""
import dataclasses
import platform
from pathlib import Path

import pytest

from edgeq import backends
from edgeq.backends import Backend
from edgeq.backends.gguf.backend import GgufBackend
from edgeq.build import BuildOptions, check_options
from edgeq.errors import EdgeqError
from edgeq.session import open_session
from edgeq.targets import ArtifactFormat, load_target

FORMATS = ("gguf", "onnx", "tvm", "reference")


def opts(fmt, **kw):
    return BuildOptions(model=Path("m"), out=Path("o"), format=fmt, **kw)


@pytest.fixture(scope="module")
def cpu():
    return load_target("cpu-avx2")


def test_every_format_is_registered_once_in_cli_order():
    assert backends.names() == FORMATS
    for name in FORMATS:
        b = backends.get(name)
        assert isinstance(b, Backend) and b.name == name
        assert b.runtime == b.runtimes[0] and b.summary
    assert len({type(b) for b in backends.backends()}) == len(FORMATS)


def test_unknown_format_lists_the_available_ones():
    with pytest.raises(EdgeqError, match=r"unknown format 'tflite' \(available: gguf, onnx, tvm, reference\)"):
        backends.get("tflite")
    with pytest.raises(EdgeqError, match="unknown format None"):
        backends.get(None)
    assert backends.find("tflite") is None
    with pytest.raises(EdgeqError, match="unknown format 'tflite'"):
        backends.for_manifest({"format": "tflite"})


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(EdgeqError, match="'gguf' is registered twice"):
        backends.register(GgufBackend())
    assert backends.names() == FORMATS

    class Toy(Backend):
        name, runtime, runtimes = "toy", "reference", ("reference",)

    try:
        backends.register(Toy())
        assert backends.names() == (*FORMATS, "toy") and backends.get("toy").name == "toy"
        with pytest.raises(EdgeqError, match="'toy' is registered twice"):
            backends.register(Toy())
    finally:
        backends.unregister("toy")
    assert backends.names() == FORMATS


def test_a_backend_needs_a_name_and_its_own_runtime():
    class Nameless(Backend):
        runtime, runtimes = "reference", ("reference",)

    class Odd(Backend):
        name, runtime, runtimes = "odd", "x", ("y",)

    with pytest.raises(EdgeqError, match="needs a name"):
        backends.register(Nameless())
    with pytest.raises(EdgeqError, match="runtime 'x' is not in its runtimes"):
        backends.register(Odd())
    assert backends.names() == FORMATS


def test_runtimes_targets_and_roofline_ask_the_registry():
    assert backends.runtimes() == ("auto", "llamacpp", "onnxruntime", "tvm", "reference")
    assert backends.target_formats() == ("gguf", "onnx", "tvm")  # reference builds for every target
    assert [f.value for f in ArtifactFormat] == list(backends.target_formats())
    assert backends.int8_runtimes() == ("llamacpp", "onnxruntime")
    assert backends.for_runtime("llama.cpp").name == "gguf"  # LlamaCppSession.name
    assert backends.for_runtime("onnxruntime").name == "onnx"
    assert backends.for_runtime("reference").name == "reference" and backends.for_runtime("nope") is None


def test_breakdown_for_a_runtime_without_timings_says_why():
    from edgeq.breakdown import breakdown

    class FakeLlama:
        name = "llama.cpp"

    r = breakdown(FakeLlama())
    assert r["available"] is False and r["runtime"] == "llama.cpp" and "llama-cpp-python" in r["method"]
    assert breakdown(type("S", (), {"name": "other"})())["available"] is False


def test_runs_here():
    for name in ("gguf", "onnx", "reference"):
        assert backends.get(name).runs_here({"format": name})
    tvm = backends.get("tvm")
    here = {"kind": "llvm", "mtriple": f"{platform.machine()}-linux-gnu"}
    other = "aarch64" if platform.machine() != "aarch64" else "x86_64"
    assert tvm.runs_here({"tvm": {"target": here}})
    assert not tvm.runs_here({"tvm": {"target": {"kind": "llvm", "mtriple": f"{other}-linux-gnu"}}})
    assert not tvm.runs_here({"tvm": {"target": {"kind": "cuda", "arch": "sm_86"}}})
    assert tvm.device({"tvm": {"target": {"kind": "cuda", "arch": "sm_86"}}}) == "cuda sm_86"
    assert backends.get("gguf").device({"format": "gguf"}) is None


@pytest.mark.parametrize("fmt, kw, message", [
    ("reference", {"bits": 4}, "the reference format stores float32 weights"),
    ("reference", {"qtype": "Q4_0"}, "the reference format stores float32 weights"),
    ("onnx", {"qtype": "Q4_0"}, "the onnx format takes --bits 4, 8 or 32"),
    ("onnx", {"bits": 16}, "the onnx format stores int4/int8"),
    ("tvm", {"qtype": "Q4_0"}, "the tvm format takes --bits 4 or 8"),
    ("tvm", {"bits": 32}, "the tvm format stores int4 or int8"),
    ("tvm", {"bits": 16}, "the tvm format stores int4 or int8"),
])
def test_validate_rejects(cpu, fmt, kw, message):
    """The backend's own check, and build's check_options that calls it."""
    with pytest.raises(EdgeqError, match=message):
        backends.get(fmt).check_options(opts(fmt, **kw), cpu)
    with pytest.raises(EdgeqError, match=message):
        check_options(opts(fmt, **kw), cpu)


@pytest.mark.parametrize("fmt, kw, message", [
    ("gguf", {"bits": 3}, r"unsupported --bits 3"),
    ("onnx", {"plan": Path("p.toml")}, r"--plan is supported for the gguf format \(got onnx\)"),
])
def test_generic_checks_stay_in_build(cpu, fmt, kw, message):
    backends.get(fmt).check_options(opts(fmt, **kw), cpu)  # not the backend's business
    with pytest.raises(EdgeqError, match=message):
        check_options(opts(fmt, **kw), cpu)


@pytest.mark.parametrize("fmt, kw", [
    ("gguf", {"bits": 4}), ("gguf", {"qtype": "Q4_1"}), ("gguf", {}), ("onnx", {"bits": 32}), ("onnx", {"bits": 8}),
    ("tvm", {}), ("tvm", {"bits": 8}), ("reference", {}), ("reference", {"bits": 32}),
])
def test_validate_accepts(cpu, fmt, kw):
    backends.get(fmt).check_options(opts(fmt, **kw), cpu)
    check_options(opts(fmt, **kw), cpu)


def test_build_checks_the_target_runs_the_format_except_reference(cpu):
    only_gguf = dataclasses.replace(cpu, formats=(ArtifactFormat.GGUF,))
    with pytest.raises(EdgeqError, match="target cpu-avx2 does not run onnx artifacts"):
        check_options(opts("onnx"), only_gguf)
    check_options(opts("reference"), only_gguf)
    with pytest.raises(EdgeqError, match=r"unknown format 'x' \(available: gguf, onnx, tvm, reference\)"):
        check_options(opts("x"), cpu)


def test_default_options_come_from_the_target(cpu):
    assert backends.get("gguf").default_options(opts("gguf"), cpu) == {"bits": cpu.default_bits,
                                                                       "qtype": cpu.default_bits}
    assert backends.get("gguf").default_options(opts("gguf", qtype="Q5_0"), cpu)["qtype"] == "Q5_0"
    d = backends.get("onnx").default_options(opts("onnx"), cpu)
    g = cpu.quant_block_size
    assert d["bits"] == cpu.default_bits == 4
    assert (d["weights"].linear, d["weights"].head) == (f"int4_g{g}_sym", f"int8_g{g}_sym")
    assert d["weights"].accuracy_level == cpu.onnx_accuracy_level
    f32 = backends.get("onnx").default_options(opts("onnx", bits=32), cpu)["weights"]
    assert f32.linear is None and f32.head is None
    t = backends.get("tvm").default_options(opts("tvm", bits=8), cpu)["tvm"]
    assert (t.bits, t.group, t.target) == (8, g, cpu.compile_target.as_dict())
    with pytest.raises(EdgeqError, match="target cpu-avx2 defaults to 16 bits"):
        backends.get("tvm").default_options(opts("tvm"), dataclasses.replace(cpu, default_bits=16))
    assert backends.get("reference").default_options(opts("reference"), cpu) == {"bits": 32}


def test_only_gguf_takes_a_plan(cpu):
    assert [b.name for b in backends.backends() if b.plans] == ["gguf"]
    assert opts("gguf").planned and not opts("onnx").planned and not opts(None).planned
    with pytest.raises(EdgeqError, match="does not take a quantization plan"):
        backends.get("onnx").fixed_overhead_bytes(None)


@pytest.mark.parametrize("fmt, runtime, message", [
    ("onnx", "llamacpp", "an onnx artifact runs on the onnxruntime runtime only"),
    ("tvm", "reference", "a tvm artifact runs on the tvm runtime only"),
    ("reference", "llamacpp", "a reference artifact runs on the reference runtime only"),
    ("gguf", "tvm", "a gguf artifact does not run on tvm"),
    ("gguf", "onnxruntime", "a gguf artifact does not run on onnxruntime"),
    ("tflite", "auto", "unsupported artifact format 'tflite'"),
])
def test_open_session_checks_the_runtime_against_the_backend(tmp_path, fmt, runtime, message):
    with pytest.raises(EdgeqError, match=message):
        open_session(tmp_path, runtime=runtime, manifest={"format": fmt})
    with pytest.raises(EdgeqError, match=r"unknown runtime 'x' \(available: auto, llamacpp, onnxruntime"):
        open_session(tmp_path, runtime="x", manifest={"format": fmt})


def test_switches_in_place_everywhere_but_gguf():
    assert [b.name for b in backends.backends() if not b.switches_in_place] == ["gguf"]


def test_eval_takes_every_backend_runtime_for_artifacts_only(tiny_llama):
    from edgeq.eval_cmd import RUNTIMES, open_target

    assert RUNTIMES == backends.runtimes()
    with pytest.raises(EdgeqError, match="--runtime tvm runs artifacts only"):
        open_target(tiny_llama, runtime="tvm")


def test_cli_choices_come_from_the_registry():
    from click.testing import CliRunner

    from edgeq.cli import main

    r = CliRunner().invoke(main, ["build", "m", "--format", "tflite", "-o", "x"])
    assert r.exit_code == 1 and "'gguf', 'onnx', 'tvm', 'reference'" in r.output
    r = CliRunner().invoke(main, ["run", "a", "--prompt", "p", "--runtime", "tflite"])
    assert r.exit_code == 1 and "'auto', 'llamacpp', 'onnxruntime', 'tvm', 'reference'" in r.output
