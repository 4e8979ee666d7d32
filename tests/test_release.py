"""Release matrix (`edgeq build --target a,b,c`): every artifact byte-identical to its single-target
build, shared steps run once, release.json, failures, verify/profile of a release directory."""
import hashlib
import json
import re

import pytest
from release_trees import leftovers, run_cli, same_tree

# (calibration small: the statistics are shared, not their size, is what is tested)
PRUNED = ["--bits", "4", "--prune-rates", "0,0.25", "--calib-samples", "4", "--calib-len", "32"]
TARGETS = ["cpu-avx2", "gpu-t4", "mobile-arm64"]


@pytest.fixture(scope="module")
def singles(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("singles")
    for t in TARGETS:
        code, text = run_cli("build", tiny_llama, "--target", t, *PRUNED, "-o", root / t)
        assert code == 0, text
    return root


@pytest.fixture(scope="module")
def release(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "release"
    code, text = run_cli("build", tiny_llama, "--target", ",".join(TARGETS), *PRUNED, "-o", out)
    assert code == 0, text
    return out, text


def test_each_artifact_is_byte_identical_to_its_single_build(release, singles):
    out, _ = release
    fmt = {"cpu-avx2": "gguf", "gpu-t4": "onnx", "mobile-arm64": "gguf"}  # the profiles' default formats
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{t}-{fmt[t]}" for t in TARGETS] + ["release.json"])
    for t in TARGETS:
        same_tree(out / f"{t}-{fmt[t]}", singles / t)
    assert leftovers(out.parent) == []


def test_shared_steps_ran_once(release):
    out, text = release
    # the log says each step once per run; calibration and sorting ran once for three targets
    def runs(step):  # (whatever the step's version)
        return len(re.findall(rf"step {step} \(v\d+\) done", text))

    for step in ("load", "calibrate", "sort"):
        assert runs(step) == 1, step
    assert runs("lower") == 3 and runs("goldens") == 3
    idx = json.loads((out / "release.json").read_text())
    shared = {s["step"]: s["for"] for s in idx["shared_steps"]}
    assert set(shared) == {"load", "calibrate", "sort"}
    assert all(len(v) == 3 for v in shared.values())
    # the rate plan depends on the profile's pruning granularity (its config): per target
    grans = {t: json.loads((out / f"{t}-{f}" / "manifest.json").read_text())["prune"]["granularity"]
             for t, f in (("cpu-avx2", "gguf"), ("gpu-t4", "onnx"), ("mobile-arm64", "gguf"))}
    assert runs("rate_plan") == len(set(grans.values()))


def test_release_index(release, tiny_llama):
    out, _ = release
    idx = json.loads((out / "release.json").read_text())
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tiny_llama.iterdir()
             if p.name in idx["model"]["files"]}
    assert idx["model"]["files"] == files and "model.safetensors" in files
    assert idx["failed"] == [] and idx["targets"] == TARGETS
    for a in idx["artifacts"]:
        d = out / a["dir"]
        assert a["manifest_sha256"] == hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()
        m = json.loads((d / "manifest.json").read_text())
        assert a["target"] == m["target"] and a["format"] == m["format"]
        assert a["verify"] == "here" and m["goldens"]
        assert a["expressed"]["weight_type"] == m["weight_type"]
        assert a["expressed"]["prune"]["rates"] == [0.0, 0.25]


def test_verify_and_profile_accept_the_release_dir(release, tmp_path):
    out, _ = release
    code, text = run_cli("verify", out)
    assert code == 0, text
    assert "OK (3 verified here, 0 to verify on device)" in text
    code, text = run_cli("profile", out, "--quick", "--markdown", tmp_path / "r.md")
    assert code == 0, text
    md = (tmp_path / "r.md").read_text()
    assert all(f"{t}-" in md for t in TARGETS)


def test_verify_release_catches_a_swapped_manifest(release, tmp_path):
    import shutil

    out, _ = release
    copy = tmp_path / "rel"
    shutil.copytree(out, copy)
    a, b = copy / "cpu-avx2-gguf" / "manifest.json", copy / "mobile-arm64-gguf" / "manifest.json"
    a.write_bytes(a.read_bytes().replace(b'"target": "cpu-avx2"', b'"target": "cpu-avx2 "'))
    code, text = run_cli("verify", copy)
    assert code == 1 and "cpu-avx2-gguf: manifest.json does not match its hash in release.json" in text
    assert b.exists()


def test_executors_give_the_same_bytes(release, tiny_llama, tmp_path):
    out, _ = release
    other = tmp_path / "release-processes"
    code, text = run_cli("build", tiny_llama, "--target", ",".join(TARGETS), *PRUNED, "--executor", "processes",
                         "--jobs", "2", "-o", other)
    assert code == 0, text
    same_tree(other, out)
    assert leftovers(tmp_path) == []


def test_planned_matrix_shares_the_plan_of_profiles_with_the_same_types(tiny_llama, tmp_path):
    """cpu-avx2 and cpu-avx512 have the same storage types, ranks and default budget: one plan,
    labelled for each; mobile-arm64 (Q4_0/Q8_0 only) plans alone. Processes executor."""
    small = ["--calib-samples", "4", "--calib-len", "32"]
    out = tmp_path / "rel"
    code, text = run_cli("build", tiny_llama, "--target", "cpu-avx2,cpu-avx512,mobile-arm64", *small,
                         "--executor", "processes", "-o", out)
    assert code == 0, text
    idx = json.loads((out / "release.json").read_text())
    shared = {s["step"]: s["for"] for s in idx["shared_steps"]}
    assert shared["calibrate"] == ["cpu-avx2-gguf", "cpu-avx512-gguf", "mobile-arm64-gguf"]
    assert shared["plan"] == ["cpu-avx2-gguf", "cpu-avx512-gguf"]
    assert shared["quantize"] == ["cpu-avx2-gguf", "cpu-avx512-gguf"]
    single = tmp_path / "single"
    code, text = run_cli("build", tiny_llama, "--target", "cpu-avx512", *small, "-o", single)
    assert code == 0, text
    same_tree(out / "cpu-avx512-gguf", single)  # (its plan.toml names cpu-avx512, though avx2 made it)
    assert 'target = "cpu-avx512"' in (single / "plan.toml").read_text()


def test_a_failing_target_is_reported_and_the_others_complete(tiny_llama, tmp_path, monkeypatch):
    """A profile whose toolchain is missing (the aarch64 cross linker of a TVM build) fails alone:
    reported in release.json and the exit code, nothing left of it; the cross gpu-t4 build (no
    goldens here) and the host build complete, each byte-identical to its single build."""
    import edgeq.kernels.compile

    targets = "cpu-avx2,mobile-arm64,gpu-t4"
    monkeypatch.setattr(edgeq.kernels.compile, "AARCH64_CC", "aarch64-missing-linux-gnu-gcc")
    out = tmp_path / "rel"
    code, text = run_cli("build", tiny_llama, "--target", targets, "--format", "tvm", "--bits", "4", "-o", out)
    assert code == 1
    assert "error: mobile-arm64-tvm: cross-linking for aarch64 needs aarch64-missing-linux-gnu-gcc" in text
    assert sorted(p.name for p in out.iterdir()) == ["cpu-avx2-tvm", "gpu-t4-tvm", "release.json"]
    idx = json.loads((out / "release.json").read_text())
    assert [f["dir"] for f in idx["failed"]] == ["mobile-arm64-tvm"] and idx["failed"][0]["step"] == "lower"
    verify = {a["dir"]: a["verify"] for a in idx["artifacts"]}
    assert verify == {"cpu-avx2-tvm": "here", "gpu-t4-tvm": "on device"}
    assert leftovers(tmp_path) == [] and leftovers(out) == []
    for t in ("cpu-avx2", "gpu-t4"):
        code, text = run_cli("build", tiny_llama, "--target", t, "--format", "tvm", "--bits", "4", "-o", tmp_path / t)
        assert code == 0, text
        same_tree(out / f"{t}-tvm", tmp_path / t)
    assert "goldens" not in json.loads((out / "gpu-t4-tvm" / "manifest.json").read_text())
    # verify: the host artifact runs, the cross one is listed; the release is incomplete -> exit 1
    code, text = run_cli("verify", out)
    assert code == 1
    assert "cpu-avx2-tvm: OK" in text and "gpu-t4-tvm: files match the manifest; verify on device" in text
    assert "mobile-arm64-tvm: failed at build time" in text


@pytest.mark.parametrize("spec,message", [
    ("cpu-avx2,nope", "nope"),
    ("cpu-avx2,cpu-avx2", "listed twice"),
    ("cpu-avx2,", "empty name"),
])
def test_bad_target_lists_are_one_line_errors(spec, message, tiny_llama, tmp_path):
    out = tmp_path / "rel"
    code, text = run_cli("build", tiny_llama, "--target", spec, "--bits", "4", "-o", out)
    assert code == 1 and text.startswith("error:") and message in text and len(text.strip().splitlines()) == 1
    assert not out.exists() and leftovers(tmp_path) == []


def test_target_all_lists_every_profile(tiny_llama, tmp_path):
    from edgeq.build import BuildOptions
    from edgeq.release import members_for, parse_targets
    from edgeq.targets import list_targets

    names = parse_targets("all")
    assert names == [t.name for t in list_targets()] and len(names) == 6
    members, _ = members_for(BuildOptions(model=tiny_llama, out=tmp_path, format=None), names, [None], tmp_path, None)
    assert len(members) == 6
