"""The build pipeline as data (edgeq.pipeline): build.steps turns options into frozen, versioned
step configs; one runner times, logs and records each step in the manifest."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgeq import pipeline
from edgeq.build import BuildOptions, build, check_options, plan_steps, steps
from edgeq.errors import EdgeqError
from edgeq.pipeline import BuildContext, LoadStep, RatePlanStep, Step
from edgeq.targets import load_target


@pytest.fixture(scope="module")
def cpu():
    return load_target("cpu-avx2")


def names(opts, target):
    check_options(opts, target)
    return [s.name for s in steps(opts, target)]


def test_steps_follow_the_options(cpu, tmp_path):
    o = BuildOptions(model=Path("m"), out=tmp_path / "o")
    assert names(dataclasses.replace(o, bits=4), cpu) == ["load", "check_memory", "lower", "goldens"]
    assert names(dataclasses.replace(o, bits=4, record_goldens=False, adapters=(Path("a"),)), cpu) == \
        ["load", "adapters", "check_memory", "lower"]
    assert names(o, cpu) == ["load", "check_memory", "calibrate", "plan", "quantize", "lower", "goldens"]
    assert names(dataclasses.replace(o, plan=Path("p.toml")), cpu) == \
        ["load", "check_memory", "plan", "calibrate", "quantize", "lower", "goldens"]  # a plan file is checked first
    assert names(dataclasses.replace(o, bits=8, prune_rates=(0.25, 0.0), recover=True), cpu) == \
        ["load", "check_memory", "calibrate", "sort", "rate_plan", "recover", "lower", "goldens"]
    assert names(dataclasses.replace(o, format="onnx"), cpu) == ["load", "check_memory", "lower", "goldens"]
    assert [s.name for s in plan_steps(o)] == ["load", "calibrate", "plan"]


def test_step_configs_are_frozen_versioned_records(cpu, tmp_path):
    o = BuildOptions(model=Path("m"), out=tmp_path / "o", bits=8, prune_rates=(0.25,), importance="uniform")
    rp = next(s for s in steps(o, cpu) if isinstance(s, RatePlanStep))
    assert rp.rates == (0.0, 0.25) and rp.granularity == cpu.prune_granularity  # checked, 0 first
    with pytest.raises(dataclasses.FrozenInstanceError):
        rp.rates = (0.5,)
    assert rp.record() == {"name": "rate_plan", "version": 1,
                           "config": {"rates": [0.0, 0.25], "granularity": cpu.prune_granularity,
                                      "importance": "uniform"}}
    json.dumps([s.record() for s in steps(o, cpu)])  # every config is JSON


def test_a_step_name_is_registered_once():
    assert pipeline.registered()["load"] is LoadStep
    with pytest.raises(EdgeqError, match="step name 'load' is registered twice"):
        @dataclass(frozen=True)
        class Again(Step):
            name = "load"
    assert pipeline.registered()["load"] is LoadStep


@dataclass(frozen=True)
class _Mark(Step):
    name = "test_mark"
    value: int = 0

    def run(self, ctx):
        ctx.log(f"mark {self.value}")


@dataclass(frozen=True)
class _Write(Step):
    name = "test_write"
    writes_artifact = True
    fail: bool = False

    def run(self, ctx):
        (ctx.tmp / "payload.bin").write_bytes(b"x")
        ctx.manifest = {"format": "test"}
        if self.fail:
            raise EdgeqError("simulated failure in a writing step")


def test_runner_times_logs_and_records_each_step(cpu, tmp_path):
    lines = []
    ctx = BuildContext(opts=None, target=cpu, log=lines.append)
    out = tmp_path / "art"
    pipeline.run([_Mark(value=1), _Write(), _Mark(value=2)], ctx, out=out)
    assert set(ctx.timings) == {"test_mark", "test_write"} and all(t >= 0 for t in ctx.timings.values())
    assert "mark 1" in lines and any(line.startswith("step test_write (v1) done in") for line in lines)
    m = json.loads((out / "manifest.json").read_text())
    assert m["steps"] == [{"name": "test_mark", "version": 1, "config": {"value": 1}},
                          {"name": "test_write", "version": 1, "config": {"fail": False}},
                          {"name": "test_mark", "version": 1, "config": {"value": 2}}]
    assert (out / "payload.bin").read_bytes() == b"x"


def test_runner_leaves_nothing_when_a_step_fails(cpu, tmp_path):
    out = tmp_path / "art"
    with pytest.raises(EdgeqError, match="simulated failure"):
        pipeline.run([_Write(fail=True)], BuildContext(opts=None, target=cpu, log=lambda m: None), out=out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # without a writing step nothing is opened or written
    ctx = pipeline.run([_Mark()], BuildContext(opts=None, target=cpu, log=lambda m: None), out=out)
    assert ctx.tmp is None and not out.exists()


def test_a_signal_as_the_artifact_directory_opens_leaves_nothing(cpu, tmp_path, monkeypatch):
    """SIGINT after atomic_directory has made its temporary directory but before the runner's
    ExitStack has recorded the exit that removes it: the signal waits until it has, so the
    directory goes with the interrupt instead of staying behind (seen in CI as .prev.tmp-*)."""
    import signal
    import threading

    import edgeq.pipeline.runner as runner

    real = runner.atomic_directory

    class SignalAfterEnter:
        def __init__(self, *a, **kw):
            self.cm = real(*a, **kw)

        def __enter__(self):
            tmp = self.cm.__enter__()
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return tmp

        def __exit__(self, *exc):
            return self.cm.__exit__(*exc)

    monkeypatch.setattr(runner, "atomic_directory", SignalAfterEnter)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as exc:  # (held: the cleanup must not wait for GC)
            pipeline.run([_Write()], BuildContext(opts=None, target=cpu, log=lambda m: None), out=tmp_path / "art")
    finally:
        signal.signal(signal.SIGINT, before)
    assert exc.type is KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_step_missing_its_input_is_a_clean_error(cpu):
    with pytest.raises(EdgeqError, match="step quantize needs plan"):
        pipeline.run([pipeline.QuantizeStep()], BuildContext(opts=None, target=cpu, log=lambda m: None))


def test_build_records_its_steps_in_the_manifest(tiny_llama, tmp_path):
    out = tmp_path / "a"
    res = build(BuildOptions(model=tiny_llama, out=out, bits=8, record_goldens=False), log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    assert m == res.manifest
    assert [(s["name"], s["version"]) for s in m["steps"]] == [("load", 1), ("check_memory", 1), ("lower", 1)]
    assert m["steps"][0]["config"] == {"model": str(tiny_llama)}
    assert m["steps"][2]["config"] == {"format": "gguf"}
    for key in ("format", "target", "options", "source", "hparams", "history", "files", "weight_type"):
        assert key in m
    assert list(res.timings) == ["load", "check_memory", "lower"]
