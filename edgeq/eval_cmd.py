"""`edgeq eval`: WikiText-2 perplexity, KL vs the fp32 reference and LAMBADA for one target.

The logic behind the CLI command (no click here). The target is an artifact directory
(opened with :func:`edgeq.session.open_session`) or a source model (HF checkpoint directory or
.gguf file, run by the reference runtime, or by llama.cpp for a .gguf with ``--runtime
llamacpp``). Every number follows ../shared/design/BENCHMARK_PROTOCOL.md; perplexity and KL
come from one pass over the same windows.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import click

from edgeq import __version__, evaluate
from edgeq.artifact import MANIFEST, read_manifest
from edgeq.backends import runtimes
from edgeq.errors import EdgeqError
from edgeq.frontend import load_adapter, load_model, merge_adapters
from edgeq.session import default_threads, open_session
from runtimes.llamacpp import LlamaCppSession
from runtimes.reference import ReferenceSession

TASKS = ("wikitext", "kl", "lambada")
RUNTIMES = runtimes()  # an artifact: whatever its backend accepts (edgeq.session.open_session checks)
SOURCE_RUNTIMES = ("auto", "llamacpp", "reference")  # a source model: llama.cpp for a .gguf, else the reference
PPL_CTX = 512


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def parse_tasks(spec: str | None, have_reference: bool) -> tuple[str, ...]:
    """``None``: all tasks, ``kl`` only where a reference exists; else a comma-separated list."""
    if spec is None:
        return tuple(t for t in TASKS if t != "kl" or have_reference)
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise EdgeqError(f"unknown task {bad[0] if bad else spec!r} (available: {', '.join(TASKS)})")
    return tuple(t for t in TASKS if t in tasks)


def is_artifact(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def open_target(target: str | Path, runtime: str = "auto", n_ctx: int = 2048, threads: int | None = None,
                prune: float | None = None):
    """(session, manifest or None) for an artifact directory or a source model, at pruning rate
    ``prune``: for an artifact a rate it carries (:func:`edgeq.session.open_session` picks the
    rate's file); for a source model ``set_prune_rate`` on the session, where supported."""
    path = Path(target)
    if runtime not in RUNTIMES:
        raise EdgeqError(f"unknown runtime {runtime!r} (available: {', '.join(RUNTIMES)})")
    if not path.exists():
        raise EdgeqError(f"{path}: no such file or directory")
    if is_artifact(path):
        m = read_manifest(path)
        return open_session(path, runtime=runtime, n_ctx=n_ctx, threads=threads, manifest=m, prune=prune), m
    if runtime not in SOURCE_RUNTIMES:
        raise EdgeqError(f"{path}: --runtime {runtime} runs artifacts only (a source model runs on "
                         f"{' or '.join(SOURCE_RUNTIMES[1:])})")
    if runtime == "llamacpp":
        if not (path.is_file() and path.suffix == ".gguf"):
            raise EdgeqError(f"{path}: --runtime llamacpp runs artifacts and .gguf files only")
        session = LlamaCppSession(path, n_ctx=n_ctx, n_threads=threads or default_threads())
    else:
        session = ReferenceSession(load_model(path), n_ctx=n_ctx)
    if prune is not None:
        try:
            _set_prune(session, prune)
        except BaseException:
            session.close()
            raise
    return session, None


def reference_ir(manifest: dict | None, reference: str | Path | None = None):
    """The fp32 model KL is measured against.

    ``reference`` given: that model as is. Else the artifact's source model
    (``manifest["source"]["path"]``, checked against the recorded sha256s) with the manifest's
    adapters loaded — merged if the artifact merged them, else kept as low-rank branches (the
    reference runtime applies them at run time, as llama.cpp applies the adapter files).
    """
    if reference is not None:
        return load_model(reference)
    if manifest is None:
        raise EdgeqError("kl needs a reference model: pass --reference MODEL_DIR")
    src = manifest.get("source") or {}
    if not src.get("path"):
        raise EdgeqError("the manifest records no source model path; pass --reference MODEL_DIR")
    hint = " (pass --reference MODEL_DIR)"
    try:
        ir = load_model(src["path"])
    except EdgeqError as exc:
        raise EdgeqError(f"KL reference: {exc}{hint}") from None
    want, got = src.get("files") or {}, (ir.source or {}).get("files") or {}
    changed = sorted(k for k in want if k in got and want[k] != got[k])
    if changed:
        raise EdgeqError(f"KL reference: {src['path']} has changed since the build ({', '.join(changed)} "
                         f"differ from the manifest's sha256){hint}")
    adapters = manifest.get("adapters") or {}
    for name, info in adapters.items():
        try:
            ir = load_adapter(ir, info["path"], name=name)
        except (EdgeqError, KeyError) as exc:
            raise EdgeqError(f"KL reference: adapter {name!r}: {exc}{hint}") from None
    if adapters and (manifest.get("options") or {}).get("adapter_mode", "merge") == "merge":
        ir = merge_adapters(ir)
    return ir


def _set_prune(session, rate: float) -> None:
    if not hasattr(session, "set_prune_rate"):
        raise EdgeqError(f"--prune: the {session.name} runtime cannot switch pruning rates "
                         "(use --runtime reference, or an artifact built with --prune-rates)")
    session.set_prune_rate(rate)


def run_eval(target: str | Path, runtime: str = "auto", prune: float | None = None,
             tasks: str | tuple[str, ...] | None = None, limit: int | None = None,
             ppl_tokens: int | None = 16384, reference: str | Path | None = None,
             threads: int | None = None, ctx: int = PPL_CTX, progress: bool = True,
             log: Callable[[str], None] = _log) -> dict:
    """Evaluate ``target``; returns the JSON report (see :func:`format_report`).

    ``ppl_tokens``: the first N tokens of WikiText-2 (None or 0: the whole text); ``limit``:
    the first N LAMBADA items (None: all 5153).
    """
    t_all = time.perf_counter()
    path = Path(target)
    artifact = is_artifact(path)
    if isinstance(tasks, str) or tasks is None:
        tasks = parse_tasks(tasks, have_reference=artifact or reference is not None)
    if limit is not None and limit < 1:
        raise EdgeqError(f"--limit must be >= 1, got {limit}")
    if ppl_tokens is not None and ppl_tokens < 0:
        raise EdgeqError(f"--ppl-tokens must be >= 0, got {ppl_tokens}")
    max_tokens = ppl_tokens or None
    if "kl" in tasks and not artifact and reference is None:
        raise EdgeqError("kl needs a reference model: pass --reference MODEL_DIR")
    # fail on missing data before loading anything
    text = evaluate.wikitext2_test_text() if ("wikitext" in tasks or "kl" in tasks) else None
    lambada_file = evaluate.lambada_path() if "lambada" in tasks else None

    log(f"opening {path}")
    session, manifest = open_target(path, runtime=runtime, threads=threads, prune=prune)
    report: dict = {"target": str(path), "kind": "artifact" if artifact else "model",
                    "runtime": session.name, "prune_rate": prune, "tasks": list(tasks),
                    "edgeq_version": __version__}
    if manifest is not None:
        report["weight_type"] = manifest.get("weight_type")
        report["format"] = manifest.get("format")
    ref = None
    try:
        if "kl" in tasks:
            log("loading the fp32 reference" + (f" {reference}" if reference else " (the artifact's source)"))
            ref_ir = reference_ir(manifest, reference)
            ref = ReferenceSession(ref_ir, n_ctx=ctx)
            ref_desc = {"path": str(reference or ref_ir.source.get("path")),
                        "adapters": sorted(ref_ir.adapters),
                        "adapter_mode": ((manifest or {}).get("options") or {}).get("adapter_mode", "merge")
                        if ref_ir.adapters and reference is None else None,
                        "runtime": ref.name, "dtype": "float32"}
        if text is not None:
            t = time.perf_counter()
            tokens = list(session.tokenize(text, add_special=False))
            if ref is not None:
                evaluate.check_same_tokenizer(session, ref, text)
            n = min(len(tokens), max_tokens) if max_tokens else len(tokens)
            log(f"wikitext-2 test: {n} of {len(tokens)} tokens, windows of {ctx}"
                + (" (+ KL vs reference)" if ref is not None else ""))
            res = evaluate.evaluate_wikitext(session, ref, tokens=tokens, ctx=ctx, max_tokens=max_tokens,
                                             progress=progress)
            secs = time.perf_counter() - t
            if "wikitext" in tasks:
                report["wikitext"] = {**res.perplexity.to_json(), "text_tokens": len(tokens), "seconds": secs}
            if res.kl is not None:
                report["kl"] = {**res.kl.to_json(), "reference": ref_desc,
                                "reference_ppl": res.reference_perplexity.ppl, "seconds": secs}
        if ref is not None:
            ref.close()
            ref = None
        if lambada_file is not None:
            t = time.perf_counter()
            log(f"lambada: {'first ' + str(limit) if limit else 'all'} items of {lambada_file}")
            lam = evaluate.lambada(session, path=lambada_file, limit=limit, progress=progress)
            report["lambada"] = {**lam.to_json(), "seconds": time.perf_counter() - t}
    finally:
        if ref is not None:
            ref.close()
        session.close()
    report["seconds"] = time.perf_counter() - t_all
    return report


def format_report(r: dict) -> str:
    """A readable table of a :func:`run_eval` report."""
    head = f"{r['target']} ({r['kind']}"
    if r.get("weight_type"):
        head += f", {r['weight_type']}"
    head += f", runtime {r['runtime']}"
    if r.get("prune_rate") is not None:
        head += f", prune {r['prune_rate']:g}"
    rows = [("task", "metric", "value")]
    if "wikitext" in r:
        w = r["wikitext"]
        rows.append(("wikitext-2", f"perplexity ({w['scored_tokens']} scored tokens, ctx {w['ctx']})",
                     f"{w['ppl']:.4f}"))
    if "kl" in r:
        k = r["kl"]
        rows += [("kl", f"mean KL(ref ‖ model), nats ({k['count']} positions)", f"{k['mean_kl']:.5f}"),
                 ("kl", "p99 KL, nats", f"{k['p99_kl']:.5f}"),
                 ("kl", "top-1 agreement", f"{k['top1_agreement']:.4f}"),
                 ("kl", "reference perplexity", f"{k['reference_ppl']:.4f}")]
    if "lambada" in r:
        la = r["lambada"]
        rows.append(("lambada", f"accuracy ({la['correct']}/{la['items']} items"
                     + (f", first {la['limit']}" if la.get("limit") else "") + ")", f"{la['accuracy']:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [head + f"; {r['seconds']:.1f}s)"]
    for j, row in enumerate(rows):
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}")
        if j == 0:
            lines.append("-" * (sum(widths) + 4))
    return "\n".join(lines)
