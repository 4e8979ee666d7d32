"""Command line: parse options and call the library; EdgeqError -> one line on stderr, exit 1."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from edgeq import __version__, backends
from edgeq.errors import EdgeqError
from edgeq.interrupts import must_not_raise_in
from edgeq.kernels.spec import ACTS

FORMAT_HELP = ", ".join(f"{b.name} ({b.summary})" for b in backends.backends())


def _fail_cleanly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeqError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt as exc:
            click.echo("terminated" if isinstance(exc, Terminated) else "interrupted", err=True)
            sys.exit(143 if isinstance(exc, Terminated) else 130)
        except OSError as exc:  # disk full, file too large, permission denied, ...: one line
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}", err=True)
            sys.exit(1)

    return wrapper


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that ``finally`` blocks and temp-dir cleanups run."""


def _raise_terminated(signum, frame):
    """SIGTERM -> Terminated, SIGINT -> KeyboardInterrupt; but where the signal interrupted code
    that drops exceptions raised in it (a ctypes callback such as llama.cpp's log callback, or the
    import system's weakref callbacks: Python prints "Exception ignored" and the build runs on,
    seen in CI), the signal is sent again 50 ms later instead, once that code has returned
    (``edgeq.interrupts``)."""
    if must_not_raise_in(frame):
        import os
        import threading

        again = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        again.daemon = True
        again.start()
        return
    import signal

    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class _OneLineErrors(click.Group):
    """Options click rejects (an unknown --format, --bits 3.5, a missing argument) end like every
    other bad input: one ``error:`` line on stderr and exit 1, not click's usage block and exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # SIGTERM cleans up like Ctrl-C
            signal.signal(signal.SIGTERM, _raise_terminated)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                signal.signal(signal.SIGINT, _raise_terminated)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # plain `edgeq`: the help text
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) else ""
            click.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(1)
        except click.exceptions.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeq")
def main():
    """edgeq: compile fine-tuned LLMs (+ LoRA adapters) into verified edge artifacts."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
@_fail_cleanly
def targets(as_json):
    """List the hardware target profiles (targets/*.toml)."""
    from edgeq.targets import list_targets
    from edgeq.targets_table import format_targets_table

    profiles = list_targets()
    if as_json:
        click.echo(json.dumps([p.to_json() for p in profiles], indent=1))
    else:
        click.echo(format_targets_table(profiles))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--adapter", "adapters", multiple=True, type=click.Path(path_type=Path),
              help="PEFT LoRA adapter directory (repeatable).")
@click.option("--adapter-mode", type=click.Choice(["merge", "separate"]), default="merge", show_default=True,
              help="Merge adapters into the weights, or keep each as a LoRA-adapter file applied at run time.")
@click.option("--target", default="cpu-avx2", show_default=True,
              help="Hardware profile (see `edgeq targets`); a comma list or 'all' builds a release matrix: one "
                   "artifact per target under -o/<target>-<format>/ plus release.json, shared steps run once.")
@click.option("--format", "fmt", type=click.Choice(backends.names()), default=None,
              help=f"Artifact format: {FORMAT_HELP}. Default: the target's first (cpu: gguf, gpu: onnx).")
@click.option("--bits", type=int, default=None,
              help="Weight bits: 8 (Q8_0 / int8) or 4 (Q4_0 / int4), 32 float; default: the target's.")
@click.option("--qtype", default=None, help="Explicit weight type for the block linears (e.g. Q4_1); overrides --bits.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Output artifact directory.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-goldens", is_flag=True, help="Skip recording goldens (the artifact cannot be verified).")
@click.option("--prune-rates", default=None,
              help="Structured pruning rates the artifact carries, e.g. 0,0.15,0.25,0.35 (UniQL-style sort + plan).")
@click.option("--sort", type=click.Choice(["uniql", "naive", "flap"]), default="uniql", show_default=True,
              help="How prunable dimensions are ranked: UniQL (calibrated), the weight-norm baseline, or FLAP's "
                   "fluctuation metric (calibrated; Q/K pairs by UniQL's score).")
@click.option("--importance", type=click.Choice(["angular", "uniform", "measured", "fluctuation"]), default="angular",
              show_default=True,
              help="Per-layer pruning allocation; measured: from each layer's MLP loss-vs-width curve; fluctuation: "
                   "FLAP's standardised channel scores under one threshold across layers (both need --prune-dims "
                   "mlp; fluctuation needs --sort flap).")
@click.option("--calib-samples", type=int, default=64, show_default=True, help="Alpaca calibration sequences.")
@click.option("--calib-len", type=int, default=256, show_default=True, help="Tokens per calibration sequence.")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="Alpaca JSON for calibration (default: ../shared/data/alpaca/alpaca_small.json).")
@click.option("--recover", is_flag=True, help="LoRA recovery fine-tune with a rate sampled per step, merged back.")
@click.option("--recover-steps", type=int, default=None, help="Recovery fine-tune steps (default: see RecoverConfig).")
@click.option("--recover-loss", type=click.Choice(["ce", "kl"]), default="ce", show_default=True,
              help="Recovery loss: next-token cross-entropy on the text (ce), or KL distillation from the "
                   "unpruned model's logits (kl).")
@click.option("--prune-bias", is_flag=True,
              help="Per-rate bias compensation: each rate adds the mean contribution of the inputs it prunes "
                   "(o_proj / ffn_down; FLAP), switched with the rate.")
@click.option("--prune-dims", type=click.Choice(["all", "mlp"]), default="all", show_default=True,
              help="What a rate prunes: MLP channels, Q/K RoPE pairs and V/O components (all), or only MLP "
                   "channels at the same parameter rate (mlp).")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None,
              help="Replay a quantization plan (from `edgeq plan`, or an artifact's plan.toml).")
@click.option("--budget-mb", type=float, default=None,
              help="Planner: total artifact size in MB (1e6 bytes). Default: the target's plan.default_bpw.")
@click.option("--bpw", type=float, default=None, help="Planner: bits per weight over the 2-D weights.")
@click.option("--sensitivity", type=click.Choice(["fisher", "kl-probe"]), default="kl-probe", show_default=True,
              help="Planner: how a tensor's layer error becomes predicted KL: a model tail re-run per tensor "
                   "(kl-probe, exact, O(layers^2)) or second order from one forward + 16 backward passes for all "
                   "tensors (fisher, O(params); docs/benchmarks.md).")
@click.option("--min-speed", type=float, default=None,
              help="Planner: predicted decode speed at least this x the uniform plan of the same size (e.g. 0.97; "
                   "the profile's speed costs, docs/targets.md). A prediction: measured mixed plans ran 0-4 % "
                   "slower than predicted (docs/benchmarks.md), so ask ~3 % more for a hard floor.")
@click.option("--tvm-activations", type=click.Choice(list(ACTS)), default=None,
              help="--format tvm: the kernels' activations, float32 or int8 per group with integer dot products "
                   "(AVX-512 VNNI, AVX-VNNI, AVX2, aarch64 dotprod). Default: the target's [deploy] tvm_activations.")
@click.option("--chat-template", default=None, metavar="chatml|gemma|FILE",
              help="Attach a chat template (replacing the checkpoint's): a built-in (chatml: <|im_start|> turns; "
                   "gemma: <start_of_turn> turns) or a jinja file in the Hugging Face chat_template form. For a base "
                   "model fine-tuned into a chat model (Gemma 3 270M ships none).")
@click.option("--executor", default=None, show_default="inprocess; ray with --ray-address",
              metavar="inprocess|processes|ray|ray://HOST:PORT",
              help="Run the build's tasks in this process, in parallel worker processes, or on Ray (ray: "
                   "join the instance `ray start` began on this machine or start one; ray://HOST:PORT: a Ray Client "
                   "address): a release matrix's targets, and within a build the quantize step's linears and the "
                   "calibration's shards of samples (one task each). Ray needs the extra edgeq[ray] and every node "
                   "seeing the output dir, model and data at the same paths.")
@click.option("--jobs", type=int, default=None,
              help="--executor processes: worker processes (default: CPU count); --executor ray: CPUs of a Ray "
                   "instance the build starts itself.")
@click.option("--ray-address", default=None, metavar="HOST:PORT",
              help="--executor ray: the cluster to join (its GCS address, from a node of the cluster; or ray://...).")
@_fail_cleanly
def build(model, adapters, adapter_mode, target, fmt, bits, qtype, out, force, no_goldens, prune_rates, sort,
          importance, calib_samples, calib_len, calib_data, recover, recover_steps, recover_loss, prune_bias,
          prune_dims, plan_file, budget_mb, bpw, sensitivity, min_speed, tvm_activations, chat_template, executor,
          jobs, ray_address):
    """Compile MODEL (HF checkpoint dir or .gguf) into an artifact directory (or, for several
    targets, a release directory)."""
    from edgeq.build import BuildOptions, build as run_build

    rates = None
    if prune_rates is not None:
        from edgeq.passes.rate_plan import parse_rates

        rates = parse_rates(prune_rates)
    opts = BuildOptions(model=model, out=out, target=target, format=fmt, bits=bits, qtype=qtype,
                        adapters=tuple(adapters), adapter_mode=adapter_mode, force=force,
                        record_goldens=not no_goldens, prune_rates=rates, sort=sort, importance=importance,
                        calib_samples=calib_samples, calib_len=calib_len, calib_data=calib_data,
                        recover=recover, recover_steps=recover_steps, recover_loss=recover_loss,
                        prune_bias=prune_bias, prune_dims=prune_dims,
                        plan=plan_file, budget_mb=budget_mb, bpw=bpw,
                        sensitivity=sensitivity, min_speed=min_speed, tvm_activations=tvm_activations,
                        chat_template=chat_template)
    from edgeq.release import is_matrix

    if jobs is not None and jobs < 1:
        raise EdgeqError(f"--jobs must be >= 1, got {jobs}")
    if is_matrix(target):
        _build_release(opts, target, fmt, executor, jobs, ray_address)
        return
    res = run_build(opts, executor=executor, jobs=jobs, ray_address=ray_address)
    m = res.manifest
    size = sum(f["bytes"] for f in m["files"].values())
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items())
    wt = "mixed plan" if m.get("plan_file") else m["weight_type"]
    click.echo(f"built {res.out} ({m['format']}, {wt}, {size / 1e6:.1f} MB) in {res.seconds:.1f}s ({steps})")
    if m.get("plan_file"):
        sz = m["size"]
        click.echo(f"plan: per-tensor choices in {res.out / m['plan_file']} (replay with --plan); size predicted "
                   f"{sz['predicted_total_bytes'] / 1e6:.2f} MB, realised {sz['realised_total_bytes'] / 1e6:.2f} MB "
                   f"({sz['bpw']:.3f} bpw)")


def _build_release(opts, target, fmt, executor, jobs, ray_address):
    from edgeq.release import build_release

    res = build_release(opts, target, fmt, executor=executor, jobs=jobs, ray_address=ray_address)
    idx = res.index
    for a in idx["artifacts"]:
        where = "verified here" if a["verify"] == "here" else f"verify on device ({a['device']})"
        click.echo(f"built {res.out / a['dir']} ({a['format']}, {a['expressed']['weight_type']}; {where})")
    once = [s for s in res.step_seconds if len(s["for"]) > 1]
    saved = sum(s["seconds"] * (len(s["for"]) - 1) for s in once)
    click.echo(f"release {res.out}: {len(idx['artifacts'])} artifacts in {res.seconds:.1f}s; "
               f"{len(once)} shared step runs saved ~{saved:.1f}s of repeated work; index {res.out / 'release.json'}")
    for f in idx["failed"]:
        click.echo(f"error: {f['dir']}: {f['error']} (step {f['step']})", err=True)
    if idx["failed"]:
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--adapter", "adapters", multiple=True, type=click.Path(path_type=Path),
              help="PEFT LoRA adapter directory (repeatable; merged before planning).")
@click.option("--target", default="cpu-avx2", show_default=True, help="Hardware profile (see `edgeq targets`).")
@click.option("--budget-mb", type=float, default=None, help="Total artifact size in MB (1e6 bytes).")
@click.option("--bpw", type=float, default=None,
              help="Bits per weight over the 2-D weights (default: the target's plan.default_bpw).")
@click.option("--calib-samples", type=int, default=64, show_default=True, help="Alpaca calibration sequences.")
@click.option("--calib-len", type=int, default=256, show_default=True, help="Tokens per calibration sequence.")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None, help="Alpaca JSON for calibration.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Plan file to write (TOML).")
@click.option("--sensitivity", type=click.Choice(["fisher", "kl-probe"]), default="kl-probe", show_default=True,
              help="Planner: how a tensor's layer error becomes predicted KL: a model tail re-run per tensor "
                   "(kl-probe, exact, O(layers^2)) or second order from one forward + 16 backward passes for all "
                   "tensors (fisher, O(params); docs/benchmarks.md).")
@click.option("--min-speed", type=float, default=None,
              help="Predicted decode speed at least this x the uniform plan of the same size (e.g. 0.97; a "
                   "prediction: measured mixed plans ran 0-4 % slower, so ask ~3 % more for a hard floor).")
@_fail_cleanly
def plan(model, adapters, target, budget_mb, bpw, calib_samples, calib_len, calib_data, out, sensitivity, min_speed):
    """Choose a per-tensor quantization type and compensation rank for TARGET's budget."""
    from edgeq import pipeline
    from edgeq.build import BuildOptions, check_options, plan_steps
    from edgeq.plan import n_weights, plan_bytes
    from edgeq.targets import load_target

    opts = BuildOptions(model=model, out=out, target=target, adapters=tuple(adapters), budget_mb=budget_mb,
                        bpw=bpw, calib_samples=calib_samples, calib_len=calib_len, calib_data=calib_data,
                        sensitivity=sensitivity, min_speed=min_speed)
    prof = load_target(target)
    check_options(opts, prof)
    ctx = pipeline.run(plan_steps(opts),
                       pipeline.BuildContext(opts=opts, target=prof, log=lambda m: click.echo(m, err=True)))
    ir, p = ctx.ir, ctx.plan
    p.save(out)
    nb = plan_bytes(ir, p)
    click.echo(f"wrote {out}: {nb / 1e6:.2f} MB of weights ({nb * 8 / n_weights(ir):.3f} bpw), "
               f"predicted KL {p.summary.get('predicted_kl', float('nan')):.4g}"
               + (f", predicted decode {p.summary['predicted_speed_vs_reference']:.3f}x the uniform "
                  f"{p.summary['speed_reference'].split()[-1]} plan" if "predicted_speed_vs_reference" in p.summary else ""))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap the prompt in the model's chat template.")
@click.option("--runtime", type=click.Choice(backends.runtimes()), default="auto", show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--prune", type=float, default=None, help="Pruning rate to run at (one the artifact carries).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy; > 0: sample.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k most likely (0: all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=None, help="Sampling seed (reproducible runs).")
@_fail_cleanly
def run(artifact, prompt, max_tokens, chat, runtime, threads, prune, temperature, top_k, top_p, seed):
    """Generate text from an artifact, streaming tokens (greedy, or sampled with --temperature)."""
    from edgeq.session import open_session
    from runtimes.base import Sampling

    if max_tokens < 1:
        raise EdgeqError(f"--max-tokens must be >= 1, got {max_tokens}")
    if threads is not None and threads < 1:
        raise EdgeqError(f"--threads must be >= 1, got {threads}")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    with open_session(artifact, runtime=runtime, threads=threads, prune=prune) as s:
        if chat and not s.has_chat_template:
            click.echo("note: the artifact has no chat template, so the prompt goes in as written "
                       "(`edgeq build --chat-template` attaches one; --raw silences this note)", err=True)
        for piece in s.generate(prompt, max_tokens=max_tokens, chat=chat, sampling=sampling):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        st = s.last_stats
        click.echo(f"[{st.new_tokens} tokens, prefill {st.prefill_tok_s:.1f} tok/s, "
                   f"decode {st.decode_tok_s:.1f} tok/s, {s.name}]", err=True)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--runtime", type=click.Choice(backends.runtimes()), default="auto", show_default=True)
@click.option("--json", "json_file", type=click.Path(path_type=Path), default=None, help="Also write the report as JSON.")
@_fail_cleanly
def verify(artifact, runtime, json_file):
    """Regression check: file hashes, rerun vs recorded goldens and vs the fp32 reference. A release
    directory (release.json): every artifact that runs here, the others listed as "verify on device"."""
    from edgeq.release import read_release
    from edgeq.verify import verify as run_verify

    index = read_release(artifact)
    if index is not None:
        _verify_release(artifact, index, runtime, json_file)
        return
    rep = run_verify(artifact, runtime=runtime)
    _print_verify(rep)
    if json_file:
        json_file.write_text(json.dumps(rep.to_json(), indent=1))
    for p in rep.problems:
        click.echo(f"FAIL {p}", err=True)
    if not rep.ok:
        sys.exit(1)
    click.echo("OK")


def _verify_release(root, index, runtime, json_file):
    from edgeq.release import verify_release

    chk = verify_release(root, index, runtime=runtime)
    for d, rep in chk.verified.items():
        click.echo(f"== {d}")
        _print_verify(rep)
        for p in rep.problems:
            click.echo(f"FAIL {d}: {p}", err=True)
        click.echo(f"{d}: {'OK' if rep.ok else 'FAIL'}")
    for d, (device, problems) in chk.on_device.items():
        for p in problems:
            click.echo(f"FAIL {d}: {p}", err=True)
        click.echo(f"{d}: {'files match the manifest; ' if not problems else ''}verify on device ({device})")
    for p in chk.problems:
        click.echo(f"FAIL {p}", err=True)
    if json_file:
        json_file.write_text(json.dumps({"verified": {d: r.to_json() for d, r in chk.verified.items()},
                                         "on_device": {d: {"device": dv, "problems": pr}
                                                       for d, (dv, pr) in chk.on_device.items()},
                                         "problems": chk.problems, "ok": chk.ok}, indent=1))
    if not chk.ok:
        sys.exit(1)
    click.echo(f"OK ({len(chk.verified)} verified here, {len(chk.on_device)} to verify on device)")


def _print_verify(rep):
    for key in rep.regression or {}:
        r, f = rep.regression[key], rep.reference[key]
        at = f"rate {key}: " if len(rep.regression) > 1 else ""
        click.echo(f"{at}regression vs recorded goldens: top-1 {r['top1_agreement']:.4f}, "
                   f"max |Δ log-prob| {r['max_logprob_diff']:.2g} over {r['positions']} positions")
        clear = "n/a" if f["clear_top1_agreement"] is None else f"{f['clear_top1_agreement']:.4f}"
        click.echo(f"{at}vs fp32 reference: top-1 {f['top1_agreement']:.4f} ({clear} at {f['clear_positions']} "
                   f"clear positions), mean KL {f['mean_kl']:.4g}, relative KL {f['relative_kl']:.4g}, "
                   f"p99 KL {f['p99_kl']:.4g}")
    for n in rep.notes:
        click.echo(f"NOTE {n}")


@main.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--runtime", type=click.Choice(backends.runtimes()), default="auto", show_default=True)
@click.option("--runs", type=int, default=5, show_default=True, help="Timed runs (after one warm-up).")
@click.option("--max-tokens", type=int, default=128, show_default=True, help="Decode length.")
@click.option("--threads", type=int, default=None)
@click.option("--json", "json_file", type=click.Path(path_type=Path), default=None, help="Also write JSON here.")
@click.option("--prune", default=None, help="Pruning rate to profile, or 'all' to sweep every carried rate.")
@click.option("--report", "report_file", type=click.Path(path_type=Path), default=None,
              help="Write a self-contained HTML report (several artifacts side by side; plots, roofline, breakdown).")
@click.option("--markdown", "md_file", type=click.Path(path_type=Path), default=None, help="Write the report as Markdown.")
@click.option("--quick", is_flag=True, help="Report: fewer runs and lengths (a fast pass).")
@_fail_cleanly
def profile(artifacts, runtime, runs, max_tokens, threads, json_file, prune, report_file, md_file, quick):
    """Latency / memory summary: TTFT, prefill and decode tok/s, peak RSS, size, roofline. With
    several artifacts, --report or --markdown, or a release directory: the full report (edgeq.report)
    over the artifacts that run here (the release's others are listed as "verify on device")."""
    from edgeq.profile import format_profile, format_sweep, profile as run_profile, profile_sweep

    if runs < 1 or max_tokens < 2:
        raise EdgeqError("--runs must be >= 1 and --max-tokens >= 2")
    if threads is not None and threads < 1:
        raise EdgeqError(f"--threads must be >= 1, got {threads}")
    from edgeq.release import read_release, runnable_artifacts

    expanded, release_given = [], False
    for a in artifacts:  # a release directory: its artifacts that run here (the others: on their device)
        index = read_release(a)
        if index is None:
            expanded.append(a)
            continue
        release_given = True
        here, there = runnable_artifacts(a, index)
        for d, device in there:
            click.echo(f"{a / d}: verify on device ({device}); not profiled here")
        if not here:
            raise EdgeqError(f"{a}: no artifact of this release runs here")
        expanded += here
    artifacts = tuple(expanded)
    for a in artifacts:
        if not (a / "manifest.json").is_file():
            raise EdgeqError(f"{a}: not an artifact directory (no manifest.json)")
    if len(artifacts) > 1 or report_file or md_file or release_given:
        from edgeq.report import build_report, to_markdown, write_reports

        if prune is not None:
            raise EdgeqError("--prune does not apply to a report (it sweeps every rate each artifact carries)")
        rep = build_report(list(artifacts), runtime=runtime, threads=threads, quick=quick, log=click.echo)
        write_reports(rep, html_path=report_file, md_path=md_file, json_path=json_file)
        click.echo(to_markdown(rep))
        return
    (artifact,) = artifacts
    if prune == "all":
        p = profile_sweep(artifact, runtime=runtime, runs=runs, max_tokens=max_tokens, threads=threads)
        click.echo(format_sweep(p))
    else:
        try:
            rate = None if prune is None else float(prune)
        except ValueError:
            raise EdgeqError(f"--prune expects a rate or 'all', got {prune!r}") from None
        p = run_profile(artifact, runtime=runtime, runs=runs, max_tokens=max_tokens, threads=threads, prune=rate)
        click.echo(format_profile(p))
    if json_file:
        json_file.write_text(json.dumps(p, indent=1))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--tensors", is_flag=True, help="List every tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@_fail_cleanly
def inspect(artifact, tensors, as_json):
    """Show an artifact's manifest, files, tensor types and sizes."""
    from edgeq.describe import describe, format_description

    d = describe(artifact)
    click.echo(json.dumps(d, indent=1) if as_json else format_description(d, show_tensors=tensors))


@main.command("eval")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--runtime", type=click.Choice(backends.runtimes()), default="auto", show_default=True)
@click.option("--prune", type=float, default=None, help="Pruning rate: one the artifact carries; for a source model, via set_prune_rate.")
@click.option("--tasks", default=None,
              help="Comma-separated subset of wikitext,kl,lambada (default: all; kl where a reference exists).")
@click.option("--limit", type=int, default=None, help="LAMBADA: only the first N items (default: all 5153).")
@click.option("--ppl-tokens", type=int, default=16384, show_default=True,
              help="WikiText-2: the first N tokens (0: the whole text).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="fp32 model for KL (default: the artifact's source model + its adapters).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--json", "json_file", type=click.Path(path_type=Path), default=None, help="Also write JSON here.")
@_fail_cleanly
def eval_(target, runtime, prune, tasks, limit, ppl_tokens, reference, threads, json_file):
    """Accuracy: WikiText-2 perplexity, KL vs the fp32 reference, LAMBADA (benchmark protocol)."""
    from edgeq.eval_cmd import format_report, run_eval

    if threads is not None and threads < 1:
        raise EdgeqError(f"--threads must be >= 1, got {threads}")

    rep = run_eval(target, runtime=runtime, prune=prune, tasks=tasks, limit=limit, ppl_tokens=ppl_tokens,
                   reference=reference, threads=threads)
    click.echo(format_report(rep))
    if json_file:
        json_file.write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
