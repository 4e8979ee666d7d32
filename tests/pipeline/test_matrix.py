"""The release matrix as data (edgeq.pipeline.matrix): which steps run once for which targets
follows from the step configs and what each step reads from the target, not from step names."""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.build import BuildOptions
from edgeq.pipeline import BuildContext, Step, registered
from edgeq.pipeline.executors import load_context, save_context
from edgeq.pipeline.matrix import Member, plan_tree, run_matrix
from edgeq.release import members_for


def shared(tree) -> dict[str, list[list[str]]]:
    out: dict[str, list[list[str]]] = {}

    def walk(nodes):
        for n in nodes:
            out.setdefault(n.step.name, []).append(n.labels)
            walk(n.children)

    walk(tree)
    return out


def tree_for(targets, tmp_path, **kw):
    opts = BuildOptions(model=Path("m"), out=tmp_path / "o", format=None, **kw)
    members, _ = members_for(opts, targets, [None], tmp_path, None)
    return plan_tree(members)


def test_planned_defaults_share_load_calibration_and_the_plan_of_equal_storage_types(tmp_path):
    t = shared(tree_for(["cpu-avx2", "cpu-avx512", "mobile-arm64", "gpu-t4"], tmp_path))
    assert t["load"] == [["cpu-avx2-gguf", "cpu-avx512-gguf", "mobile-arm64-gguf", "gpu-t4-onnx"]]
    assert t["calibrate"] == [["cpu-avx2-gguf", "cpu-avx512-gguf", "mobile-arm64-gguf"]]  # onnx: no planner
    assert t["plan"] == [["cpu-avx2-gguf", "cpu-avx512-gguf"], ["mobile-arm64-gguf"]]
    assert t["quantize"] == t["plan"]
    assert "check_memory" not in t and "lower" not in t  # checks run per target; tails never shared


def test_an_explicit_bpw_does_not_make_different_types_share(tmp_path):
    t = shared(tree_for(["cpu-avx2", "mobile-arm64"], tmp_path, bpw=5.0))
    assert t["plan"] == [["cpu-avx2-gguf"], ["mobile-arm64-gguf"]]


def test_pruning_shares_calibration_and_sort_and_splits_the_rate_plan_by_granularity(tmp_path):
    from edgeq.targets import load_target

    names = ["cpu-avx2", "cpu-avx512", "gpu-t4", "gpu-rtx3060", "mobile-arm64"]
    t = shared(tree_for(names, tmp_path, bits=4, prune_rates=(0.0, 0.25)))
    assert len(t["calibrate"]) == 1 and len(t["calibrate"][0]) == 5 and len(t["sort"]) == 1
    by_gran: dict[int, list[str]] = {}
    for n in names:
        prof = load_target(n)
        by_gran.setdefault(prof.prune_granularity, []).append(f"{n}-{prof.formats[0].value}")
    assert sorted(t["rate_plan"]) == sorted(by_gran.values())


def test_every_step_that_reads_the_target_or_options_declares_it():
    """A step whose run reads ctx.target / ctx.opts must say what (target_inputs) or only check:
    otherwise the matrix would share a result that differs between targets."""
    for name, cls in registered().items():
        src = inspect.getsource(cls)
        if re.search(r"ctx\.(target|opts)\b", src) and not cls.checks_only:
            assert cls.target_inputs is not Step.target_inputs, f"step {name} reads the target but declares nothing"


# --- the runner of the tree, on toy steps (no model) ---

@dataclass(frozen=True)
class _Add(Step):
    name = "test_matrix_add"
    value: int

    def run(self, ctx):
        ctx.plan = (ctx.plan or ()) + (self.value,)


@dataclass(frozen=True)
class _Scaled(Step):
    """Reads the target (its name's length stands for a profile field)."""

    name = "test_matrix_scaled"

    def run(self, ctx):
        ctx.plan = ctx.plan + (len(ctx.target.name),)

    def target_inputs(self, target, opts):
        return {"len": len(target.name)}


@dataclass(frozen=True)
class _Boom(Step):
    name = "test_matrix_boom"

    def run(self, ctx):
        from edgeq.errors import EdgeqError

        raise EdgeqError("simulated toolchain missing")


@dataclass(frozen=True)
class _Write(Step):
    name = "test_matrix_write"
    writes_artifact = True

    def run(self, ctx):
        (ctx.tmp / "out.txt").write_text(repr(ctx.plan))
        ctx.manifest = {"plan": list(ctx.plan)}


@dataclass(frozen=True)
class _T:
    name: str


def _member(label, target, steps, root):
    ctx = BuildContext(opts=None, target=_T(target), log=lambda m: None)
    return Member(label=label, ctx=ctx, steps=steps, out=root / label)


def test_the_tree_runs_shared_steps_once_and_fails_members_alone(tmp_path, monkeypatch):
    runs = []
    orig = _Add.run
    monkeypatch.setattr(_Add, "run", lambda self, ctx: (runs.append(self.value), orig(self, ctx)))
    a = _member("a", "aa", [_Add(1), _Add(2), _Scaled(), _Write()], tmp_path)
    b = _member("b", "bb", [_Add(1), _Add(2), _Scaled(), _Write()], tmp_path)  # same name length: shares
    c = _member("c", "ccc", [_Add(1), _Add(3), _Write()], tmp_path)
    d = _member("d", "dd", [_Add(1), _Add(2), _Boom(), _Write()], tmp_path)
    res = run_matrix([a, b, c, d], BuildContext(opts=None, target=_T("aa"), log=lambda m: None))
    assert sorted(runs) == [1, 2, 3]  # _Add(1) once for four, _Add(2) once for a, b, d
    assert (tmp_path / "a" / "out.txt").read_text() == "(1, 2, 2)"
    assert (tmp_path / "b" / "out.txt").read_text() == "(1, 2, 2)"
    assert (tmp_path / "c" / "out.txt").read_text() == "(1, 3)"
    assert not res.outcomes["d"].ok and res.outcomes["d"].error == "simulated toolchain missing"
    assert res.outcomes["d"].failed_step == "test_matrix_boom" and not (tmp_path / "d").exists()
    man = res.outcomes["a"].manifest  # every step of a's list recorded, as a single build records them
    assert man["plan"] == [1, 2, 2] and man["steps"] == [s.record() for s in a.steps]


def test_a_context_file_holds_large_arrays_as_separate_files(tmp_path):
    big, small = np.arange(40000, dtype=np.float32).reshape(200, 200), np.arange(4.0)
    ctx = BuildContext(opts=None, target=None, log=print, stats={"big": big, "again": big, "small": small})
    path = save_context(ctx, tmp_path)
    npys = list(Path(path).parent.glob("*.npy"))
    assert len(npys) == 1 and Path(path).stat().st_size < big.nbytes  # once, and not inside the pickle
    back = load_context(path)
    assert isinstance(back.stats["big"], np.memmap) and np.array_equal(back.stats["big"], big)
    assert np.array_equal(back.stats["small"], small)


@dataclass(frozen=True)
class _DiesOnce(Step):
    """Kills its own worker process the first time (a marker file remembers it)."""

    name = "test_matrix_dies_once"
    marker: str

    def run(self, ctx):
        import os
        import signal

        if not Path(self.marker).exists():
            Path(self.marker).write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)
        ctx.plan = ctx.plan + (99,)


def test_processes_retry_a_task_whose_worker_was_killed(tmp_path):
    from edgeq.pipeline.executors import Processes
    from edgeq.pipeline.matrix import PrefixLog

    marker = tmp_path / "marker"
    out = tmp_path / "rel"
    members = []
    for label in ("a", "b"):
        ctx = BuildContext(opts=None, target=_T(label), log=PrefixLog(f"[{label}] "))
        steps = [_Add(1), _DiesOnce(str(marker)), _Add(ord(label)), _Write()]
        members.append(Member(label=label, ctx=ctx, steps=steps, out=out / label))
    res = run_matrix(members, BuildContext(opts=None, target=_T("a"), log=PrefixLog("")),
                     executor=Processes(tmp_path / "work", jobs=2))
    assert marker.read_text() == "killed"  # a worker did die
    assert all(o.ok for o in res.outcomes.values()), res.outcomes
    assert (out / "a" / "out.txt").read_text() == "(1, 99, 97)"
    assert (out / "b" / "out.txt").read_text() == "(1, 99, 98)"
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    assert list((tmp_path / "work").iterdir()) == []  # the contexts' temp dir is gone
