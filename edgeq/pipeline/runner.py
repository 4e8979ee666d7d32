"""The build runner: a build is a list of step configs, run in order by :func:`run`.

A step is a frozen dataclass (its fields are its configuration: what it was asked to do) with a
class-level ``name`` and ``version`` and a ``run(ctx)`` method that reads and updates the
:class:`BuildContext` (the model IR, calibration statistics, the plan, the manifest ...). Step
names are registered once (defining a second step class with a name already taken is an error).

The runner times each step, logs it, and records it (name, version, config) in the manifest's
``steps`` list. Before the first step that writes the artifact (``writes_artifact``) it opens the
temporary artifact directory (``edgeq.artifact.atomic_directory``); after the last step it writes
the manifest and renames the directory into place. Any exception leaves the output untouched.

Bump a step's ``version`` when the same config would produce different output.

A release matrix (:mod:`edgeq.pipeline.matrix`) runs the step lists of several targets at once and
runs a step once for every target whose steps so far have the same keys: a step's key is its
record plus :meth:`Step.target_inputs` (what it reads from the target profile or the options
beyond its own fields); ``checks_only`` steps (they read the context and change nothing) run per
target without splitting the shared work; :meth:`Step.adopt` rebinds a result made for one target
to another that shares it (e.g. the plan's target label).
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from edgeq.artifact import atomic_directory, write_manifest
from edgeq.blas import one_blas_thread
from edgeq.errors import EdgeqError
from edgeq.interrupts import deferred_signals

if TYPE_CHECKING:  # type hints only: build.py imports the pipeline
    from edgeq.build import BuildOptions
    from edgeq.ir import ModelIR
    from edgeq.targets import TargetProfile

Log = Callable[[str], None]

_STEPS: dict[str, type["Step"]] = {}


@dataclass(frozen=True)
class Step:
    """Base class of the step configs (subclass with ``@dataclass(frozen=True)``)."""

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    writes_artifact: ClassVar[bool] = False  # runs inside the temporary artifact directory
    checks_only: ClassVar[bool] = False  # reads the context and changes nothing (a refusal check)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if not cls.name:
            raise EdgeqError(f"step {cls.__name__}: a step needs a name")
        if cls.name in _STEPS:
            raise EdgeqError(f"step name {cls.name!r} is registered twice "
                             f"({_STEPS[cls.name].__name__} and {cls.__name__})")
        _STEPS[cls.name] = cls

    def run(self, ctx: "BuildContext") -> None:
        raise NotImplementedError

    def target_inputs(self, target: "TargetProfile", opts: "BuildOptions") -> dict[str, Any]:
        """What this step reads from ``ctx.target`` / ``ctx.opts`` beyond its own fields (JSON
        values). Two targets whose steps have equal records and equal inputs here get the same
        result, so a release matrix runs the step once for both. Default: nothing."""
        return {}

    def adopt(self, ctx: "BuildContext") -> None:
        """Rebind what this step produced for another target to ``ctx.target`` (the matrix calls
        it on a context that reuses a shared result). Default: nothing to rebind."""

    def config(self) -> dict[str, Any]:
        """The step's fields as JSON values (paths as strings, tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def record(self) -> dict[str, Any]:
        """What the manifest's ``steps`` list holds for this step."""
        return {"name": self.name, "version": self.version, "config": self.config()}


def registered() -> dict[str, type[Step]]:
    """Step name -> step class, in definition order."""
    return dict(_STEPS)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


@dataclass
class BuildContext:
    """What the steps share while a build runs."""

    opts: "BuildOptions"  # what the user typed (the backends read it)
    target: "TargetProfile"
    log: Log
    ir: "ModelIR | None" = None
    float_ir: "ModelIR | None" = None  # the model before quantization (planned builds)
    calib_seqs: list | None = None  # calibration token sequences
    stats: Any = None  # edgeq.calibrate.CalibStats
    sort_scores: Any = None  # per layer, the sorted MLP channels' scores in their new order (the FLAP sort)
    plan: Any = None  # edgeq.plan.Plan
    tmp: Path | None = None  # the temporary artifact directory (from the first writing step on)
    manifest: dict | None = None
    ref_ir: "ModelIR | None" = None  # what the goldens compare the artifact against
    timings: dict[str, float] = field(default_factory=dict)  # step name -> seconds
    records: list[dict] = field(default_factory=list)  # the steps run so far (manifest "steps")
    split: Any = None  # edgeq.pipeline.split.Split: a layer's linears as executor tasks (None: here, in turn)

    def need(self, attr: str, step: Step) -> Any:
        v = getattr(self, attr)
        if v is None:
            raise EdgeqError(f"step {step.name} needs {attr}, which no earlier step produced")
        return v


def run(steps: Sequence[Step], ctx: BuildContext, out: Path | None = None, force: bool = False) -> BuildContext:
    """Run ``steps`` in order on ``ctx``; an artifact is written to ``out`` when a step writes one."""
    with ExitStack() as stack:
        for step in steps:
            if step.writes_artifact and ctx.tmp is None:
                if out is None:
                    raise EdgeqError(f"step {step.name} writes an artifact; no output directory given")
                # deferred: a signal between the directory's creation and ExitStack recording its
                # exit would leave the directory behind (seen in CI as a stray .<out>.tmp-*)
                with deferred_signals():
                    ctx.tmp = stack.enter_context(atomic_directory(out, force=force))
            t, cpu = time.perf_counter(), time.process_time()
            with one_blas_thread():  # (byte-identical across thread counts: edgeq.blas)
                step.run(ctx)
            dt, cpu = time.perf_counter() - t, time.process_time() - cpu
            ctx.timings[step.name] = ctx.timings.get(step.name, 0.0) + dt
            ctx.records.append(step.record())
            # (CPU: this process's threads; not its worker processes')
            ctx.log(f"step {step.name} (v{step.version}) done in {dt:.1f}s (CPU {cpu:.1f}s)")
        if ctx.tmp is not None:
            if ctx.manifest is None:
                raise EdgeqError("the build wrote no manifest (no lowering step?)")
            ctx.manifest = write_manifest(ctx.tmp, {**ctx.manifest, "steps": list(ctx.records)})
    return ctx
