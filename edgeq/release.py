"""`edgeq build MODEL --target a,b,c -o out/release`: a release matrix, shared steps run once.

One artifact per (target, format) at ``out/release/<target>-<format>/``, each byte-identical to the
single-target build with the same options: every member's step list is exactly
``edgeq.build.steps`` for its target, and :mod:`edgeq.pipeline.matrix` runs the steps whose keys
agree (record + what they read from the target) once. ``release.json`` indexes the release:
the model and adapter hashes, each artifact's manifest hash, what each profile expressed, which
artifacts were verified here (goldens recorded on this host) and which must be verified on the
device, and the targets that failed (with the exit code 1) while the others completed. The
release directory is written like an artifact: a temporary directory renamed into place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeq import __version__, backends
from edgeq.artifact import atomic_directory, dump_json
from edgeq.build import BuildOptions, check_options, resolve_format, steps
from edgeq.errors import EdgeqError
from edgeq.pipeline import BuildContext
from edgeq.pipeline.matrix import Member, PrefixLog, describe_tree, run_matrix
from edgeq.targets import TargetProfile, list_targets, load_target

RELEASE_FILE = "release.json"
RELEASE_SCHEMA = 1


def _log(msg: str) -> None:
    import click

    click.echo(msg, err=True)


def is_matrix(target: str) -> bool:
    """``--target`` names several profiles (a comma list) or ``all``."""
    return target == "all" or "," in target


def parse_targets(spec: str) -> list[str]:
    if spec == "all":
        return [t.name for t in list_targets()]
    names = [t.strip() for t in spec.split(",")]
    if any(not n for n in names):
        raise EdgeqError(f"--target {spec!r}: empty name in the list")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EdgeqError(f"--target {spec!r}: {', '.join(dup)} listed twice")
    return names


def parse_formats(spec: str | None) -> list[str | None]:
    if spec is None:
        return [None]
    names = [f.strip() for f in spec.split(",")]
    for n in names:
        backends.get(n)  # an unknown format: one error line listing the registered ones
    if len(set(names)) != len(names):
        raise EdgeqError(f"--format {spec!r}: a format listed twice")
    return names


@dataclass
class ReleaseResult:
    out: Path
    index: dict
    seconds: float
    step_seconds: list[dict]

    @property
    def failed(self) -> list[dict]:
        return self.index["failed"]


def members_for(opts: BuildOptions, names: list[str], formats: list[str | None], root: Path,
                sink: Callable[[str], None] | None) -> tuple[list[Member], dict[str, TargetProfile]]:
    """One member per (target, format): options resolved and checked as a single build checks
    them (a combination that cannot be built is bad input: nothing is written)."""
    members, profiles = [], {}
    for name in names:
        prof = profiles.get(name) or load_target(name)
        profiles[name] = prof
        for fmt in formats:
            o = resolve_format(dataclasses.replace(opts, target=name, format=fmt), prof)
            label = f"{name}-{o.format}"
            o = dataclasses.replace(o, out=root / label, force=False)
            if o.format != "tvm":  # --tvm-activations chooses the tvm members' kernels only
                o = dataclasses.replace(o, tvm_activations=None)
            try:
                check_options(o, prof)
            except EdgeqError as exc:
                raise EdgeqError(f"{label}: {exc}") from None
            log = PrefixLog(f"[{label}] ", sink)
            members.append(Member(label=label, ctx=BuildContext(opts=o, target=prof, log=log),
                                  steps=steps(o, prof), out=o.out))
    return members, profiles


def build_release(opts: BuildOptions, target_spec: str, format_spec: str | None = None, executor: str | None = None,
                  jobs: int | None = None, log: Callable[[str], None] = _log,
                  ray_address: str | None = None) -> ReleaseResult:
    """Build every (target, format) of ``target_spec`` x ``format_spec`` into ``opts.out``."""
    from edgeq.pipeline.executors import make_executor
    from edgeq.spill import spilling

    t0 = time.perf_counter()
    names, formats = parse_targets(target_spec), parse_formats(format_spec)
    out = Path(opts.out)
    sink = None if log is _log else log
    with atomic_directory(out, force=opts.force) as tmp:
        members, profiles = members_for(opts, names, formats, tmp, sink)
        ex = make_executor(executor, tmp, jobs, ray_address)  # (its context files: inside the release's temp dir)
        ctx = BuildContext(opts=members[0].ctx.opts, target=members[0].ctx.target, log=PrefixLog("", sink))
        with spilling(out.resolve().parent):
            from edgeq.pipeline.matrix import plan_tree

            log(f"release matrix: {len(members)} artifacts ({', '.join(m.label for m in members)}), "
                f"executor {ex.name}; steps and the targets they run for:")
            for line in describe_tree(plan_tree(members)):
                log(f"  {line}")
            res = run_matrix(members, ctx, executor=ex)
        index = release_index(opts, members, profiles, res, executor)
        dump_json(index, tmp / RELEASE_FILE)
    return ReleaseResult(out=out, index=index, seconds=time.perf_counter() - t0, step_seconds=res.step_seconds)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def release_index(opts: BuildOptions, members: list[Member], profiles: dict[str, TargetProfile], res,
                  executor: str | None) -> dict:
    """release.json (deterministic: no times, no absolute paths)."""
    from edgeq.pipeline.matrix import Node

    artifacts, failed, source, adapters = [], [], None, None
    options: dict = {}
    for m in members:  # the options every member was built with (they agree but on target and format)
        options.update({k: v for k, v in m.ctx.opts.to_json().items() if k not in ("target", "format")})
    for m in members:
        o = res.outcomes[m.label]
        prof = profiles[m.ctx.target.name]
        if not o.ok:
            failed.append({"target": prof.name, "format": m.ctx.opts.format, "dir": m.label,
                           "step": o.failed_step, "error": o.error, **({"shared_with": o.shared_by} if o.shared_by else {})})
            continue
        man = o.manifest
        source = source or man.get("source")
        adapters = adapters if adapters is not None else man.get("adapters")
        runs_here = bool(man.get("goldens"))
        backend = backends.for_manifest(man)
        artifacts.append({
            "target": prof.name, "format": man["format"], "dir": m.label,
            "manifest_sha256": _sha256(m.out / "manifest.json"),
            "expressed": expressed(man, prof),
            "verify": "here" if runs_here else "on device",
            **({} if runs_here else {"device": backend.device(man) or prof.reference_device}),
        })

    def shared(nodes: list[Node]) -> list[dict]:
        out = []
        for n in nodes:
            if len(n.labels) > 1:
                out.append({"step": n.step.name, "version": n.step.version, "config": n.step.config(),
                            "for": list(n.labels)})
            out += shared(n.children)
        return out

    return {
        "schema_version": RELEASE_SCHEMA, "edgeq_version": __version__,
        "model": {k: v for k, v in (source or {}).items() if k != "path"},
        "adapters": adapters or {},
        "options": options,
        "targets": [p for p in profiles], "formats": sorted({m.ctx.opts.format for m in members}),
        "artifacts": artifacts, "failed": failed,
        "shared_steps": shared(res.tree),
    }


def expressed(man: dict, prof: TargetProfile) -> dict:
    """What the profile expressed in this artifact: its weight types (planned or uniform), the
    profile's storage types this format can store, and the pruning rates it carries and how."""
    tt = man.get("tensor_types") or {}
    types = sorted(set(tt.values())) if isinstance(tt, dict) else []
    d = {"weight_type": man.get("weight_type"), "planned": bool(man.get("plan_file")),
         "tensor_types": types, "profile_types": list(prof.plan_types(man["format"]))}
    pr = man.get("prune")
    if pr:
        d["prune"] = {"rates": pr.get("rates"), "expressed": pr.get("expressed"), "dropped": pr.get("dropped")}
    return d


def read_release(root: Path) -> dict | None:
    """release.json of ``root``, or None when ``root`` is not a release directory."""
    import json

    p = Path(root) / RELEASE_FILE
    if not p.is_file():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgeqError(f"{p}: corrupt release index ({exc.__class__.__name__})") from None
    if not isinstance(d, dict) or d.get("schema_version") != RELEASE_SCHEMA or not isinstance(d.get("artifacts"), list):
        raise EdgeqError(f"{p}: not an edgeq release index (schema {RELEASE_SCHEMA})")
    for a in d["artifacts"]:
        if not isinstance(a, dict) or not isinstance(a.get("dir"), str) or "/" in a["dir"] or a["dir"] in ("", ".", ".."):
            raise EdgeqError(f"{p}: corrupt artifact entry {a!r}")
    return d


@dataclass
class ReleaseCheck:
    """`edgeq verify RELEASE`: each artifact verified here, or checked (hashes) and left for its device."""

    verified: dict  # dir -> VerifyReport
    on_device: dict  # dir -> (device, problems with its files)
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.verified.values()) \
            and not any(p for _, p in self.on_device.values())


def verify_release(root: Path, index: dict, runtime: str = "auto") -> ReleaseCheck:
    from edgeq.artifact import check_files, read_manifest
    from edgeq.verify import verify

    root = Path(root)
    chk = ReleaseCheck(verified={}, on_device={}, problems=[])
    for f in index.get("failed", []):
        chk.problems.append(f"{f.get('dir')}: failed at build time ({f.get('error')}); the release is incomplete")
    for a in index["artifacts"]:
        d = root / a["dir"]
        if not (d / "manifest.json").is_file():
            chk.problems.append(f"{a['dir']}: missing (listed in {RELEASE_FILE})")
            continue
        if _sha256(d / "manifest.json") != a.get("manifest_sha256"):
            chk.problems.append(f"{a['dir']}: manifest.json does not match its hash in {RELEASE_FILE}")
            continue
        if a.get("verify") == "here":
            chk.verified[a["dir"]] = verify(d, runtime=runtime)
        else:
            chk.on_device[a["dir"]] = (a.get("device", "its device"), check_files(d, read_manifest(d)))
    return chk


def runnable_artifacts(root: Path, index: dict) -> tuple[list[Path], list[tuple[str, str]]]:
    """The release's artifacts that run here, and (dir, device) of those to be run on their device."""
    here = [Path(root) / a["dir"] for a in index["artifacts"] if a.get("verify") == "here"]
    there = [(a["dir"], a.get("device", "its device")) for a in index["artifacts"] if a.get("verify") != "here"]
    return here, there
