"""A release matrix: the step lists of several targets run as one tree, shared steps once.

Every member (one target and format) brings its own step list, exactly the list a single-target
build would run. Steps up to the first one that writes the artifact are *keyed*: the key of a
member's i-th step is its manifest record (name, version, config) plus what it reads from the
target and options (:meth:`~edgeq.pipeline.runner.Step.target_inputs`), chained with the keys
before it. Members with the same chain of keys share one context: the step runs once (for the
first member of the group) and its result is reused by the others, each rebinding it to its own
target (:meth:`~edgeq.pipeline.runner.Step.adopt`). Where keys diverge the context is forked (a
shallow copy: the IR, statistics and plans are immutable values or spilled files). ``checks_only``
steps (memory checks) do not enter the key: they run per member on the shared context. From the
first writing step on (lowering, goldens) every member runs its tail alone, through the ordinary
runner (:func:`edgeq.pipeline.runner.run`: its own temporary artifact directory, renamed into
place on success), with the manifest ``steps`` records of its whole list, so each artifact is
byte-identical to the single-target build.

A member that fails (its own step, or a shared step it needed) is reported with its error; the
others carry on. Nothing here knows step names: what is shared follows from the configs.

:func:`plan_tree` is the tree as data (what runs once for whom), :func:`run_matrix` runs it with
an executor (:mod:`edgeq.pipeline.executors`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgeq.blas import one_blas_thread
from edgeq.pipeline.runner import BuildContext, Step

if TYPE_CHECKING:
    from edgeq.pipeline.executors import Executor


@dataclass
class Member:
    """One (target, format) of the matrix: its context (opts, target, log), steps and output dir."""

    label: str
    ctx: BuildContext
    steps: list[Step]
    out: Path
    force: bool = False

    @property
    def split(self) -> int:
        """Index of the tail: the first step that writes the artifact, moved back over any
        checks-only steps right before it (they then run with the tail)."""
        j = next((i for i, s in enumerate(self.steps) if s.writes_artifact), len(self.steps))
        while j > 0 and self.steps[j - 1].checks_only:
            j -= 1
        return j

    def units(self) -> list[tuple[list[Step], Step]]:
        """The keyed part as (checks run before it, step) pairs."""
        out, checks = [], []
        for s in self.steps[:self.split]:
            if s.checks_only:
                checks.append(s)
            else:
                out.append((checks, s))
                checks = []
        return out

    def keys(self) -> list[str]:
        """The chained key of every unit (equal prefixes <=> the same context)."""
        keys, prev = [], ""
        for _, s in self.units():
            k = json.dumps([prev, s.record(), s.target_inputs(self.ctx.target, self.ctx.opts)], sort_keys=True,
                           default=str)
            keys.append(k)
            prev = k
        return keys


@dataclass
class Node:
    """One run of a keyed step, for ``labels`` (every member whose chain of keys goes through it)."""

    step: Step
    labels: list[str]
    children: list["Node"] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"step": self.step.name, "config": self.step.config(), "for": list(self.labels),
                "then": [c.to_json() for c in self.children]}


def plan_tree(members: list[Member]) -> list[Node]:
    """The shared-step tree: roots are the first steps; a node's children are the next steps of
    its members, one child per distinct key. Members keep their order (the first one of a group
    is the one whose target runs the shared step)."""
    keyed = [(m, m.units(), m.keys()) for m in members]

    def grow(group, depth) -> list[Node]:
        order: dict[str, list] = {}
        for item in group:
            m, units, keys = item
            if depth < len(units):
                order.setdefault(keys[depth], []).append(item)
        nodes = []
        for items in order.values():
            node = Node(step=items[0][1][depth][1], labels=[it[0].label for it in items])
            node.children = grow(items, depth + 1)
            nodes.append(node)
        return nodes

    return grow(keyed, 0)


@dataclass
class Outcome:
    """What became of one member: its manifest and step timings, or the error that stopped it."""

    label: str
    manifest: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    failed_step: str | None = None
    shared_by: list[str] = field(default_factory=list)  # the failing step was shared with these members

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class MatrixResult:
    outcomes: dict[str, Outcome]
    tree: list[Node]
    step_seconds: list[dict] = field(default_factory=list)  # every keyed step run: step, for, seconds


class PrefixLog:
    """A log function that prefixes each line (picklable, unlike a lambda: worker processes log too)."""

    def __init__(self, prefix: str, sink: Callable[[str], None] | None = None):
        self.prefix, self.sink = prefix, sink

    def __call__(self, msg: str) -> None:
        if self.sink is not None:
            self.sink(f"{self.prefix}{msg}")
        else:
            import click

            click.echo(f"{self.prefix}{msg}", err=True)


def fork(ctx: BuildContext, member: Member | None = None) -> BuildContext:
    """A context that shares ``ctx``'s values (immutable, or spilled to files) but has its own
    records and timings; with ``member``: its target, options and log."""
    c = dataclasses.replace(ctx, timings=dict(ctx.timings), records=list(ctx.records))
    if member is not None:
        c.opts, c.target, c.log = member.ctx.opts, member.ctx.target, member.ctx.log
    return c


def error_text(exc: BaseException) -> str:
    """One line for release.json / the log (EdgeqError and OSError as the CLI words them)."""
    from edgeq.errors import EdgeqError

    if isinstance(exc, EdgeqError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return f"{exc.__class__.__name__}: {exc}"


# --- tasks: what an executor runs (in this process, or in a worker from a stored context) ---

@dataclass
class Segment:
    """A chain of keyed steps that one group of members runs together, up to the next branch
    point (the group splits, or a member's keyed steps end there)."""

    nodes: list[Node]
    members: list[Member]  # every member that may run it (failures drop out on the way)
    units: dict[str, list]  # label -> that member's (checks, step) units
    depth: int  # unit index of the first node


def segments_after(nodes: list[Node], members: dict[str, Member], units: dict[str, list], depth: int) -> list[Segment]:
    """The segments starting at ``nodes`` (siblings at unit ``depth``)."""
    out = []
    for n in nodes:
        chain = [n]
        while (len(chain[-1].children) == 1 and chain[-1].children[0].labels == chain[-1].labels):
            chain.append(chain[-1].children[0])
        out.append(Segment(chain, [members[lb] for lb in n.labels], {lb: units[lb] for lb in n.labels}, depth))
    return out


def run_segment(seg: Segment, ctx: BuildContext, alive: list[str]) -> tuple[BuildContext, list[str], list[Outcome],
                                                                              list[dict]]:
    """Run ``seg`` on ``ctx`` (changed in place) for the ``alive`` members: each unit's checks per
    member, then its step once. Returns the context, the members still alive, the failures and
    the steps run (step, for, seconds)."""
    by_label = {m.label: m for m in seg.members}
    failures, runs = [], []
    for i, node in enumerate(seg.nodes):
        d = seg.depth + i
        still = []
        for lb in alive:
            bad = run_checks(by_label[lb], seg.units[lb][d][0], ctx)
            if bad is None:
                still.append(lb)
            else:
                failures.append(bad)
        alive = still
        if not alive:
            break
        rep = by_label[alive[0]]
        ctx.opts, ctx.target = rep.ctx.opts, rep.ctx.target
        ctx.log = PrefixLog(f"[{', '.join(alive)}] ", getattr(rep.ctx.log, "sink", None))
        try:
            dt = run_step(node.step, ctx)
        except Exception as exc:  # noqa: BLE001 - every member that needed this step fails with it
            failures += [Outcome(lb, error=error_text(exc), failed_step=node.step.name,
                                 shared_by=list(alive) if len(alive) > 1 else []) for lb in alive]
            alive = []
            break
        ctx.log(f"step {node.step.name} (v{node.step.version}) done in {dt:.1f}s"
                + (f", once for {len(alive)} targets" if len(alive) > 1 else ""))
        runs.append({"step": node.step.name, "for": list(alive), "seconds": dt})
    return ctx, alive, failures, runs


def run_checks(member: Member, checks: list[Step], ctx: BuildContext) -> Outcome | None:
    """The checks-only steps before a shared step, for one member (on a view of the shared context)."""
    if not checks:
        return None
    view = fork(ctx, member)
    for s in checks:
        try:
            s.run(view)
        except Exception as exc:  # noqa: BLE001
            return Outcome(member.label, error=error_text(exc), failed_step=s.name)
    return None


def run_step(step: Step, ctx: BuildContext) -> float:
    t = time.perf_counter()
    with one_blas_thread():  # (byte-identical across thread counts: edgeq.blas)
        step.run(ctx)
    dt = time.perf_counter() - t
    ctx.timings[step.name] = ctx.timings.get(step.name, 0.0) + dt
    return dt


def finish(member: Member, ctx: BuildContext) -> Outcome:
    """Run ``member``'s tail on a fork of the shared context ``ctx`` (its steps so far recorded as
    a single build records them) and write its artifact atomically."""
    from edgeq.pipeline.runner import run

    j = member.split
    c = fork(ctx, member)
    c.records = [s.record() for s in member.steps[:j]]
    try:
        for s in member.steps[:j]:
            s.adopt(c)
        run(member.steps[j:], c, out=member.out, force=member.force)
    except Exception as exc:  # noqa: BLE001 - one target's failure is reported; the others go on
        failed = member.steps[len(c.records)].name if len(c.records) < len(member.steps) else "manifest"
        return Outcome(member.label, error=error_text(exc), failed_step=failed)
    return Outcome(member.label, manifest=c.manifest, timings=dict(c.timings))


MAX_ATTEMPTS = 3  # a task whose worker died is run again, up to this many times in all


@dataclass
class _Task:
    kind: str  # segment | tail
    what: Any  # the Segment, or the member's label
    ref: Any  # the stored input context
    alive: list[str] = field(default_factory=list)
    attempts: int = 1

    def describe(self) -> str:
        if self.kind == "tail":
            return f"{self.what} (lower/goldens)"
        return f"{' -> '.join(n.step.name for n in self.what.nodes)} for {', '.join(self.alive)}"


def remove_partial(member: Member) -> None:
    """The temporary directory a killed tail left beside the member's output (atomic_directory's
    ``.<name>.tmp-*``); the output itself is only ever renamed into place whole."""
    import shutil

    out = Path(member.out).resolve()
    if out.parent.is_dir():
        for p in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def run_matrix(members: list[Member], ctx: BuildContext, executor: "Executor | None" = None) -> MatrixResult:
    """Run every member's steps, shared keyed steps once; ``ctx`` is the empty starting context.
    The executor runs the tasks (segments of shared steps, members' tails) as their inputs become
    ready; independent tasks may run at the same time."""
    from edgeq.pipeline.executors import InProcess

    labels = [m.label for m in members]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate matrix members: {labels}")
    executor = executor or InProcess()
    tree = plan_tree(members)
    result = MatrixResult(outcomes={}, tree=tree)
    by_label = {m.label: m for m in members}
    units = {m.label: m.units() for m in members}
    with executor.session(ctx) as ex:
        start = ex.store(dataclasses.replace(ctx, split=ex.split()))
        pending: dict = {}  # future -> _Task

        def submit(task: "_Task") -> None:
            if task.kind == "tail":
                pending[ex.submit_tail(by_label[task.what], task.ref)] = task
            else:
                pending[ex.submit_segment(task.what, task.ref, task.alive)] = task

        for m in members:  # (a member with no keyed steps: its tail from the start)
            if not units[m.label]:
                submit(_Task("tail", m.label, start))
        for seg in segments_after(tree, by_label, units, 0):
            submit(_Task("segment", seg, start, [m.label for m in seg.members]))
        while pending:
            fut = ex.wait_one(list(pending))
            task = pending.pop(fut)
            try:
                value = fut.result()
            except Exception as exc:  # noqa: BLE001 - the task itself was lost (a worker died ...)
                if ex.lost(exc) and task.attempts < MAX_ATTEMPTS:
                    ex.recover()
                    if task.kind == "tail":  # what the killed worker left of its artifact
                        remove_partial(by_label[task.what])
                    task.attempts += 1
                    ex.log(f"task {task.describe()} lost ({error_text(exc)}); retrying "
                           f"(attempt {task.attempts} of {MAX_ATTEMPTS})")
                    submit(task)
                    continue
                lost = [task.what] if task.kind == "tail" else task.alive
                for lb in lost:
                    result.outcomes.setdefault(lb, Outcome(lb, error=f"task lost: {error_text(exc)}",
                                                           failed_step=task.kind))
                continue
            if task.kind == "tail":
                result.outcomes[value.label] = value
                continue
            ref, alive, failures, runs = value
            for f in failures:
                result.outcomes[f.label] = f
            result.step_seconds += runs
            seg = task.what
            end = seg.depth + len(seg.nodes)
            for lb in alive:
                if len(units[lb]) == end:
                    submit(_Task("tail", lb, ref))
            for nxt in segments_after(seg.nodes[-1].children, by_label, units, end):
                keep = [lb for lb in alive if lb in nxt.units]
                if keep:
                    submit(_Task("segment", nxt, ref, keep))
    result.outcomes = {lb: result.outcomes[lb] for lb in labels}
    return result


def describe_tree(tree: list[Node], indent: str = "") -> list[str]:
    """The tree as log lines (what runs once, for which members)."""
    lines = []
    for n in tree:
        lines.append(f"{indent}{n.step.name} for {', '.join(n.labels)}")
        lines += describe_tree(n.children, indent + "  ")
    return lines
