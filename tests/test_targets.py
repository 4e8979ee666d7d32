from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeq.errors import EdgeqError
from edgeq.targets import (
    GIB,
    QUANT_TYPE_BLOCK,
    ArtifactFormat,
    DeviceKind,
    TargetProfile,
    list_targets,
    load_target,
    targets_dir,
)

SHIPPED = [
    "cpu-avx2",
    "cpu-avx512",
    "gpu-rtx3060",
    "gpu-rtx4090-laptop",
    "gpu-t4",
    "mobile-arm64",
]

GOOD_CPU = """\
name = "{name}"
description = "test cpu"
kind = "cpu"

[memory]
total_gib = 16
budget_gib = 8
bandwidth_gb_s = 51.2

[peak]
fp32_tflops = 1.0
int8_tops = 2.0

[isa]
features = ["avx2", "fma"]

[compile]
tvm_target = {{ kind = "llvm", mtriple = "x86_64-linux-gnu", mcpu = "haswell" }}

[deploy]
formats = ["gguf", "onnx"]
quant_types = ["Q4_0", "INT4"]
default_bits = 4
quant_block_size = {block}
prune_granularity = {gran}
threads = 4
"""


def write_profile(tmp_path: Path, name: str = "test-cpu", block: int = 32, gran: int = 32, text: str | None = None) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text if text is not None else GOOD_CPU.format(name=name, block=block, gran=gran))
    return path


@pytest.fixture(autouse=True)
def _default_targets_dir(monkeypatch):
    monkeypatch.delenv("EDGEQ_TARGETS_DIR", raising=False)


# ---------------------------------------------------------------------------- shipped profiles


def test_shipped_profiles_are_listed_sorted():
    names = [p.name for p in list_targets()]
    assert names == sorted(names)
    assert names == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_is_consistent(name):
    p = load_target(name)
    assert isinstance(p, TargetProfile)
    assert p.name == name
    assert p.source == targets_dir() / f"{name}.toml"
    assert p.description
    assert 0 < p.memory_budget_bytes <= p.memory_total_bytes
    assert p.bandwidth_gb_s > 0 and p.peak_fp32_tflops > 0
    assert p.isa_features and p.formats and p.quant_types
    assert all(isinstance(f, ArtifactFormat) for f in p.formats)
    assert all(q in QUANT_TYPE_BLOCK for q in p.quant_types)
    assert p.prune_granularity % p.quant_block_size == 0
    for q in p.quant_types:
        if p.block_for(q) < 256:  # K-quant super-blocks: the planner checks each tensor's widths
            assert p.prune_granularity % p.block_for(q) == 0
    assert p.default_bits == 4
    assert p.plan_bpw is not None and 4.0 < p.plan_bpw < 8.0
    assert p.plan_ranks[0] == 0 and list(p.plan_ranks) == sorted(p.plan_ranks)
    assert p.plan_types("gguf")
    if p.kind is DeviceKind.GPU:
        assert p.compile_target.kind == "cuda"
        assert p.compile_target.arch in p.isa_features
        assert p.threads is None
        assert p.quant_block_size == 128
        assert p.peak_fp16_tflops and p.peak_int8_tops and p.peak_int4_tops
    else:
        assert p.compile_target.kind == "llvm"
        assert p.compile_target.mcpu and p.compile_target.mtriple
        assert p.threads and p.threads > 0
        assert p.quant_block_size == 32
    # The TVM target renders both ways.
    d = p.compile_target.as_dict()
    assert d["kind"] == p.compile_target.kind
    assert p.compile_target.as_str().startswith(p.compile_target.kind)


def test_shipped_values_match_vendor_specs():
    t4 = load_target("gpu-t4")
    assert (t4.bandwidth_gb_s, t4.peak_fp16_tflops, t4.peak_int8_tops) == (320, 65, 130)
    assert t4.compile_target.as_dict() == {"kind": "cuda", "arch": "sm_75"}
    assert t4.memory_total_bytes == 16 * GIB
    assert load_target("gpu-rtx3060").bandwidth_gb_s == 360
    assert load_target("gpu-rtx3060").memory_total_bytes == 12 * GIB
    assert load_target("gpu-rtx4090-laptop").bandwidth_gb_s == 576
    assert load_target("gpu-rtx4090-laptop").compile_target.arch == "sm_89"
    avx2 = load_target("cpu-avx2")
    assert avx2.bandwidth_gb_s == 51.2
    assert avx2.memory_budget_bytes == 8 * GIB and avx2.memory_total_bytes == 16 * GIB
    assert avx2.compile_target.as_dict() == {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
    assert load_target("cpu-avx512").has_feature("avx512vnni")
    mobile = load_target("mobile-arm64")
    assert mobile.kind is DeviceKind.MOBILE
    assert mobile.has_feature("dotprod") and mobile.has_feature("i8mm")
    assert mobile.compile_target.mtriple.startswith("aarch64")
    assert mobile.prune_granularity == 64


def test_profile_helpers():
    p = load_target("gpu-t4")
    assert p.peak("fp16") == 65 and p.peak("int4") == 260
    assert load_target("cpu-avx2").peak("int4") is None
    assert p.supports_format("onnx") and p.supports_format(ArtifactFormat.GGUF)
    assert p.block_for("INT4") == 128 and p.block_for("Q4_0") == 32
    with pytest.raises(EdgeqError, match="unknown dtype"):
        p.peak("fp8")
    with pytest.raises(EdgeqError, match="unknown quant type"):
        p.block_for("Q9_9")
    assert abs(p.memory_budget_gib - 14) < 1e-9


# ---------------------------------------------------------------------------- lookup


def test_unknown_target_lists_known_names():
    with pytest.raises(EdgeqError) as exc:
        load_target("no-such-device")
    msg = str(exc.value)
    assert msg.startswith("unknown target 'no-such-device'; known: ")
    assert "\n" not in msg
    for name in SHIPPED:
        assert name in msg
    assert msg.endswith(", ".join(SHIPPED))


def test_profile_path_works(tmp_path):
    path = write_profile(tmp_path)
    for arg in (path, str(path)):
        p = load_target(arg)
        assert p.name == "test-cpu"
        assert p.source == path
        assert p.memory_budget_bytes == 8 * GIB
        assert p.formats == (ArtifactFormat.GGUF, ArtifactFormat.ONNX)
    # A shipped profile by path gives the same profile as by name.
    assert load_target(targets_dir() / "gpu-t4.toml") == load_target("gpu-t4")


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(EdgeqError, match="target file not found"):
        load_target(tmp_path / "absent.toml")


def test_env_overrides_targets_dir(tmp_path, monkeypatch):
    write_profile(tmp_path, name="only-one")
    monkeypatch.setenv("EDGEQ_TARGETS_DIR", str(tmp_path))
    assert targets_dir() == tmp_path
    assert [p.name for p in list_targets()] == ["only-one"]
    assert load_target("only-one").name == "only-one"
    with pytest.raises(EdgeqError, match=r"unknown target 'gpu-t4'; known: only-one$"):
        load_target("gpu-t4")


# ---------------------------------------------------------------------------- validation


def test_granularity_must_be_multiple_of_block(tmp_path):
    path = write_profile(tmp_path, block=32, gran=48)
    with pytest.raises(EdgeqError, match="prune_granularity 48 is not a multiple of quant_block_size 32"):
        load_target(path)
    # Fine when it is a multiple.
    assert load_target(write_profile(tmp_path, name="ok", block=32, gran=96)).prune_granularity == 96


def test_granularity_must_be_multiple_of_each_quant_type_block(tmp_path):
    text = GOOD_CPU.format(name="lq", block=16, gran=16)
    with pytest.raises(EdgeqError, match="prune_granularity 16 is not a multiple of the Q4_0 block size 32"):
        load_target(write_profile(tmp_path, name="lq", text=text))
    # K-quant super-blocks (256) are exempt: the planner gives them only to tensors whose widths fit
    text = GOOD_CPU.format(name="kq", block=32, gran=64).replace('"Q4_0", "INT4"', '"Q4_0", "Q4_K"')
    assert load_target(write_profile(tmp_path, name="kq", text=text)).plan_types("gguf") == ("Q4_0", "Q4_K")


def test_plan_section(tmp_path):
    text = GOOD_CPU.format(name="pl", block=32, gran=32) + "\n[plan]\ndefault_bpw = 5.0\nranks = [32, 8]\n"
    p = load_target(write_profile(tmp_path, name="pl", text=text))
    assert p.plan_bpw == 5.0 and p.plan_ranks == (0, 8, 32)
    bad = GOOD_CPU.format(name="pb", block=32, gran=32) + "\n[plan]\nranks = [-1]\n"
    with pytest.raises(EdgeqError, match="plan.ranks"):
        load_target(write_profile(tmp_path, name="pb", text=bad))
    bad = GOOD_CPU.format(name="pc", block=32, gran=32) + "\n[plan]\nbudget = 3\n"
    with pytest.raises(EdgeqError, match="unknown field 'plan.budget'"):
        load_target(write_profile(tmp_path, name="pc", text=bad))


def test_bad_profile_in_targets_dir_fails_listing(tmp_path, monkeypatch):
    write_profile(tmp_path, name="bad", block=128, gran=64)
    monkeypatch.setenv("EDGEQ_TARGETS_DIR", str(tmp_path))
    with pytest.raises(EdgeqError, match="bad.toml: prune_granularity 64"):
        list_targets()


def _variant(old: str, new: str, name: str = "v") -> str:
    text = GOOD_CPU.format(name=name, block=32, gran=32)
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize(
    "old, new, pattern",
    [
        ('description = "test cpu"\n', "", r"missing field 'description'"),
        ("bandwidth_gb_s = 51.2\n", "", r"missing field 'memory.bandwidth_gb_s'"),
        ("bandwidth_gb_s = 51.2", 'bandwidth_gb_s = "fast"', r"'memory.bandwidth_gb_s' must be a positive number, got 'fast'"),
        ("fp32_tflops = 1.0", "fp32_tflops = -1.0", r"'peak.fp32_tflops' must be a positive number"),
        ('kind = "cpu"', 'kind = "fpga"', r"'kind' must be one of cpu, gpu, mobile, got 'fpga'"),
        ('formats = ["gguf", "onnx"]', 'formats = ["gguf", "tflite"]', r"'deploy.formats' must be one of gguf, onnx, tvm"),
        ('formats = ["gguf", "onnx"]', 'formats = ["gguf", "gguf"]', r"lists 'gguf' twice"),
        ('quant_types = ["Q4_0", "INT4"]', 'quant_types = ["Q4_O"]', r"unknown quant type 'Q4_O'"),
        ("default_bits = 4", "default_bits = 7", r"'deploy.default_bits' must be one of"),
        ("quant_block_size = 32", "quant_block_size = 0", r"'deploy.quant_block_size' must be a positive integer"),
        ("threads = 4\n", "", r"missing field 'deploy.threads' \(required for a cpu target\)"),
        ("budget_gib = 8", "budget_gib = 32", r"memory budget 32 GiB exceeds total memory 16 GiB"),
        ("budget_gib = 8", "budget_bytes = 1024", None),
        ("budget_gib = 8", "budget_gib = 8\nbudget_bytes = 1024", r"give one of 'memory.budget_gib' and 'memory.budget_bytes'"),
        ("bandwidth_gb_s = 51.2", "bandwidth_gb_s = 51.2\nbandwith = 1", r"unknown field 'memory.bandwith'"),
        ('mcpu = "haswell"', 'arch = "sm_75"', r"'compile.tvm_target.arch' is for cuda targets"),
        ('kind = "llvm"', 'kind = "cuda"', r"a cpu target needs compile.tvm_target.kind = \"llvm\""),
        ('name = "v"', 'name = "Other Name"', r"'name' must be lower-case"),
        ('name = "v"', 'name = "other"', r"name 'other' does not match the file name 'v'"),
        ("[isa]", "[isa", r"invalid TOML"),
        ("threads = 4", 'threads = 4\ntvm_activations = "int4"', r"'deploy.tvm_activations' must be float32 or int8"),
    ],
)
def test_invalid_fields_give_one_line_errors(tmp_path, old, new, pattern):
    path = write_profile(tmp_path, name="v", text=_variant(old, new))
    if pattern is None:
        assert load_target(path).memory_budget_bytes == 1024
        return
    with pytest.raises(EdgeqError) as exc:
        load_target(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    assert re.search(pattern, msg), msg


def test_tvm_activations_field(tmp_path):
    assert load_target(write_profile(tmp_path, name="v")).tvm_activations == "float32"
    for features in ('["avx2", "fma", "avxvnni"]', '["avx2", "fma"]'):  # VNNI; AVX2's vpmaddubsw pair
        text = _variant('features = ["avx2", "fma"]', f'features = {features}').replace(
            "threads = 4", 'threads = 4\ntvm_activations = "int8"')
        assert load_target(write_profile(tmp_path, name="v", text=text)).tvm_activations == "int8"
    text = _variant('features = ["avx2", "fma"]', 'features = ["avx", "fma"]').replace(
        "threads = 4", 'threads = 4\ntvm_activations = "int8"')
    path = write_profile(tmp_path, name="v", text=text)
    with pytest.raises(EdgeqError, match=r"int8 needs an integer dot instruction.*avx2") as exc:
        load_target(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(str(path))


def test_gpu_profile_rules(tmp_path):
    base = load_target("gpu-t4").source.read_text()
    bad_threads = base.replace("prune_granularity = 128", "prune_granularity = 128\nthreads = 4")
    with pytest.raises(EdgeqError, match="'deploy.threads' is for cpu/mobile targets"):
        load_target(write_profile(tmp_path, name="gpu-t4", text=bad_threads))
    bad_arch = base.replace('arch = "sm_75"', 'arch = "turing"')
    with pytest.raises(EdgeqError, match="must look like sm_75"):
        load_target(write_profile(tmp_path, name="gpu-t4", text=bad_arch))
    missing_feature = base.replace('features = ["sm_75", ', "features = [")
    with pytest.raises(EdgeqError, match="must include the CUDA arch 'sm_75'"):
        load_target(write_profile(tmp_path, name="gpu-t4", text=missing_feature))


def test_quant_types_come_from_the_storage_registry(tmp_path):
    from edgeq.quant import storage

    assert QUANT_TYPE_BLOCK == {t.name: t.block_size for t in storage.types()}
    assert "Q2_K" not in QUANT_TYPE_BLOCK and "IQ4_XS" not in QUANT_TYPE_BLOCK  # edgeq writes neither
    text = GOOD_CPU.format(name="q2", block=32, gran=256).replace('"Q4_0", "INT4"', '"Q4_0", "Q2_K"')
    with pytest.raises(EdgeqError, match="unknown quant type 'Q2_K'"):
        load_target(write_profile(tmp_path, name="q2", text=text))
    # INT4 is stored by onnx/tvm only: a gguf-only target cannot list it
    text = GOOD_CPU.format(name="go", block=32, gran=32).replace('["gguf", "onnx"]', '["gguf"]')
    with pytest.raises(EdgeqError, match="'INT4' in 'deploy.quant_types' is stored by none of the target's formats"):
        load_target(write_profile(tmp_path, name="go", text=text))
