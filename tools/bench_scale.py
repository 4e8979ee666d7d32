"""Issue 14 benchmark: edgeq vs llama.cpp's own converter + quantizer on a real-size checkpoint.

    .venv/bin/python tools/bench_scale.py --shape llama-3.2-1b --work /work/scale [--ckpt DIR]
        [--formats gguf,onnx,tvm] [--skip-llamacpp] [--edgeq-args "--prune-rates 0,0.15"]
        [--planned] [--repeat N] [--mem-limit GB] [--json results.json]

The checkpoint is a random-weight Llama with the real shape (:mod:`models.scale`; made under
``WORK/ckpt-<shape>-s<seed>`` and reused, or given with ``--ckpt``). Then, each step a child
process, taken A B A B ... with ``--repeat N``:

(a) llama.cpp, from the llama-cpp-python 0.3.36 source distribution (downloaded with pip and
    unpacked once into ``WORK/llama-cpp-python-0.3.36``): its vendored ``convert_hf_to_gguf.py``
    (``--outtype bf16``, run with its own vendored gguf-py) then ``llama_model_quantize``
    (Q4_0) from the installed ``llama_cpp`` package;
(b) ``edgeq build CKPT --bits 4 --format F -o OUT --force [EDGEQ_ARGS]`` for each format.

Per step: wall time, CPU time, exit status, peak RSS as the kernel reports it for the child
(``ru_maxrss`` from ``os.wait4``: the largest RSS of the child or any descendant it waited for;
Linux also counts the launching process's image at the time of the fork, so it is never below
this script's own RSS, recorded as ``parent_rss_mb`` — the script stays small), the largest
VmHWM seen of any process in the tree (free of that effect) and, sampled every 0.2 s over the whole process tree from /proc/PID/status, the peak of the
tree's summed RSS split into anonymous (RssAnon: the process's own memory) and file-backed
(RssFile: mmapped files such as safetensors; reclaimable page cache, which llama.cpp relies
on). The page cache is not dropped between steps (that would disturb other users), so every
step after the first reads a warm checkpoint.

``--mem-limit GB`` runs the edgeq steps under a memory cap: ``systemd-run --scope -p
MemoryMax`` when systemd is available, else a cgroup v2 directory under /sys/fs/cgroup when
writable (memory.max, swap off), else a cgroup v1 directory under the v1 memory hierarchy
(/sys/fs/cgroup/memory: memory.limit_in_bytes; its peak is memory.max_usage_in_bytes, which
counts page cache as the kernel charges it), else an anonymous-memory watchdog (the sampler kills the tree
when its RssAnon exceeds the cap; not a kernel limit: file-backed pages are not counted, and
0.2 s sampling can overshoot). ``--mem-limit-method`` forces one. (``prlimit --as`` is not
used: address space counts every mapping, so it would refuse mmap-heavy processes far below
their real footprint.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA_CPP_PY = "llama-cpp-python==0.3.36"
SDIST_DIR = "llama-cpp-python-0.3.36"
Q4_0_FTYPE = 2  # LLAMA_FTYPE_MOSTLY_Q4_0
SAMPLE_S = 0.2
MB = 1e6

QUANTIZE_SCRIPT = """
import sys, llama_cpp
src, dst, ftype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = ftype
p.nthread = threads
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
sys.exit(0 if rc == 0 else 1)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- measuring


def _status_kb(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile / RssShmem of one process, in kB ({} if gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        return {}
    return out


def _tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return [pid]


class Sampler(threading.Thread):
    """Peak of the process tree's summed RSS / RssAnon / RssFile, and the largest VmHWM."""

    def __init__(self, pid: int, anon_cap_bytes: int | None = None):
        super().__init__(daemon=True)
        self.pid = pid
        self.cap_kb = anon_cap_bytes // 1024 if anon_cap_bytes else None
        self.stop = threading.Event()
        self.peak = {"rss": 0, "anon": 0, "file": 0, "hwm": 0}
        self.samples = 0
        self.killed = False

    def sample(self) -> None:
        tot = {"rss": 0, "anon": 0, "file": 0}
        for p in _tree(self.pid):
            st = _status_kb(p)
            tot["rss"] += st.get("VmRSS", 0)
            tot["anon"] += st.get("RssAnon", 0)
            tot["file"] += st.get("RssFile", 0) + st.get("RssShmem", 0)
            self.peak["hwm"] = max(self.peak["hwm"], st.get("VmHWM", 0))
        for k, v in tot.items():
            self.peak[k] = max(self.peak[k], v)
        self.samples += 1
        if self.cap_kb is not None and tot["anon"] > self.cap_kb and not self.killed:
            self.killed = True
            for p in reversed(_tree(self.pid)):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(SAMPLE_S)


class MemCap:
    """How a child is held under ``limit`` bytes: 'systemd', 'cgroup2' or 'watchdog'."""

    def __init__(self, limit: int, method: str = "auto"):
        self.limit, self.cgroup = limit, None
        if method == "auto":
            method = ("systemd" if _systemd_ok() else "cgroup2" if _cgroup2_parent()
                      else "cgroup1" if _cgroup1_parent() else "watchdog")
        if method == "systemd" and not _systemd_ok():
            raise SystemExit("error: --mem-limit-method systemd: systemd-run --scope does not work here")
        if method == "cgroup2" and not _cgroup2_parent():
            raise SystemExit("error: --mem-limit-method cgroup2: no writable cgroup v2 directory with the "
                             "memory controller")
        if method == "cgroup1" and not _cgroup1_parent():
            raise SystemExit("error: --mem-limit-method cgroup1: no writable cgroup v1 memory hierarchy")
        self.method = method

    def wrap(self, cmd: list[str]) -> list[str]:
        if self.method == "systemd":
            return ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={self.limit}",
                    "-p", "MemorySwapMax=0", "--"] + cmd
        return cmd

    def enter(self):
        """A preexec_fn for the child (cgroup2: join a fresh cgroup with memory.max)."""
        if self.method not in ("cgroup2", "cgroup1"):
            return None
        parent = _cgroup2_parent() if self.method == "cgroup2" else _cgroup1_parent()
        self.cgroup = Path(parent) / f"edgeq-bench-{os.getpid()}-{time.monotonic_ns()}"
        self.cgroup.mkdir()
        if self.method == "cgroup2":
            (self.cgroup / "memory.max").write_text(str(self.limit))
            if (self.cgroup / "memory.swap.max").exists():
                (self.cgroup / "memory.swap.max").write_text("0")
        else:
            (self.cgroup / "memory.limit_in_bytes").write_text(str(self.limit))
            if (self.cgroup / "memory.memsw.limit_in_bytes").exists():
                (self.cgroup / "memory.memsw.limit_in_bytes").write_text(str(self.limit))
        procs = str(self.cgroup / "cgroup.procs")
        return lambda: Path(procs).write_text(str(os.getpid()))

    def finish(self) -> dict:
        """After the child exited: OOM kills and peak usage the cgroup saw; remove it."""
        info: dict = {}
        if self.cgroup is None:
            return info
        try:
            if self.method == "cgroup1":
                ctl = dict(line.split() for line in (self.cgroup / "memory.oom_control").read_text().splitlines())
                info["oom_kill"] = int(ctl.get("oom_kill", 0))
                info["cgroup_peak_mb"] = int((self.cgroup / "memory.max_usage_in_bytes").read_text()) / MB
                info["cgroup_failcnt"] = int((self.cgroup / "memory.failcnt").read_text())
                return info
            events = dict(line.split() for line in (self.cgroup / "memory.events").read_text().splitlines())
            info["oom_kill"] = int(events.get("oom_kill", 0))
            if (self.cgroup / "memory.peak").exists():
                info["cgroup_peak_mb"] = int((self.cgroup / "memory.peak").read_text()) / MB
        finally:
            try:
                self.cgroup.rmdir()
            except OSError:
                pass
            self.cgroup = None
        return info


def _systemd_ok() -> bool:
    if not shutil.which("systemd-run"):
        return False
    try:
        return subprocess.run(["systemd-run", "--scope", "--quiet", "-p", "MemoryMax=1G", "--", "true"],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _cgroup2_parent() -> str | None:
    """Our cgroup v2 directory, if it is writable and can give children the memory controller."""
    try:
        rel = next(line.split("::", 1)[1].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.startswith("0::"))
    except (OSError, StopIteration):
        return None
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        d = Path(root + rel) if rel != "/" else Path(root)
        try:
            if ("memory" in (d / "cgroup.subtree_control").read_text().split()
                    and os.access(d, os.W_OK)):
                return str(d)
        except OSError:
            continue
    return None


def _cgroup1_parent() -> str | None:
    """Our cgroup v1 memory directory, if it is writable (hybrid hosts: /sys/fs/cgroup/memory)."""
    try:
        rel = next(line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if "memory" in line.split(":", 2)[1].split(","))
    except (OSError, StopIteration, IndexError):
        return None
    d = Path("/sys/fs/cgroup/memory" + (rel if rel != "/" else ""))
    return str(d) if (d / "memory.limit_in_bytes").exists() and os.access(d, os.W_OK) else None


def measure(label: str, cmd: list[str], env: dict, log_path: Path, cap: MemCap | None = None) -> dict:
    """Run ``cmd`` as a child; wall time, exit status and memory peaks (see module doc)."""
    log(f"bench: {label}: {shlex.join(cmd)}")
    full = cap.wrap(cmd) if cap else cmd
    preexec = cap.enter() if cap else None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    parent_kb = _status_kb(os.getpid()).get("VmRSS", 0)
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec)
        sampler = Sampler(proc.pid, cap.limit if cap and cap.method == "watchdog" else None)
        sampler.start()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: /proc still valid
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    res = {
        "step": label, "cmd": cmd, "rc": proc.returncode, "wall_s": round(wall, 2),
        "ru_maxrss_mb": round(ru.ru_maxrss * 1024 / MB, 1),  # Linux: kB
        "peak_tree_rss_mb": round(sampler.peak["rss"] * 1024 / MB, 1),
        "peak_anon_mb": round(sampler.peak["anon"] * 1024 / MB, 1),
        "peak_file_mb": round(sampler.peak["file"] * 1024 / MB, 1),
        "max_vmhwm_mb": round(sampler.peak["hwm"] * 1024 / MB, 1),
        "parent_rss_mb": round(parent_kb * 1024 / MB, 1),
        "samples": sampler.samples, "log": str(log_path),
        "user_s": round(ru.ru_utime, 1), "sys_s": round(ru.ru_stime, 1),
    }
    if cap:
        res["mem_limit_mb"] = round(cap.limit / MB)
        res["mem_limit_method"] = cap.method
        res.update(cap.finish())
        if sampler.killed:
            res["killed"] = "watchdog: RssAnon over the cap"
        elif res.get("oom_kill"):
            res["killed"] = "OOM killer (cgroup memory limit)"
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    res["output_tail"] = lines[-3:]
    built = [ln for ln in lines if ln.startswith("built ")]  # edgeq's summary: size and per-step times
    if built:
        res["edgeq_summary"] = built[-1]
    log(f"bench: {label}: rc {res['rc']}, {res['wall_s']} s, ru_maxrss {res['ru_maxrss_mb']:.0f} MB, "
        f"anon {res['peak_anon_mb']:.0f} MB, file {res['peak_file_mb']:.0f} MB")
    return res


# ----------------------------------------------------------------------------- the two sides


def ensure_sdist(work: Path) -> Path:
    """The unpacked llama-cpp-python sdist (downloaded and unpacked once, cached in ``work``)."""
    root = work / SDIST_DIR
    conv = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if conv.is_file():
        return root
    dl = work / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    tars = sorted(dl.glob("llama_cpp_python-0.3.36.tar.gz"))
    if not tars:
        log(f"bench: downloading the {LLAMA_CPP_PY} source distribution")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        LLAMA_CPP_PY, "-d", str(dl)], check=True)
        tars = sorted(dl.glob("llama_cpp_python-0.3.36.tar.gz"))
    tmp = work / f".{SDIST_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tars[0]) as tf:
        tf.extractall(tmp, filter="data")
    os.replace(tmp / "llama_cpp_python-0.3.36", root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def llamacpp_steps(ckpt: Path, work: Path, sdist: Path, threads: int) -> list[tuple[str, list[str], dict, Path]]:
    vendor = sdist / "vendor" / "llama.cpp"
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    bf16, q4 = out / "llamacpp-bf16.gguf", out / "llamacpp-q4_0.gguf"
    env = {**os.environ, "PYTHONPATH": str(vendor / "gguf-py")}
    env.pop("NO_LOCAL_GGUF", None)
    conv = [sys.executable, str(vendor / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(bf16),
            "--outtype", "bf16"]
    quant = [sys.executable, "-c", QUANTIZE_SCRIPT, str(bf16), str(q4), str(Q4_0_FTYPE), str(threads)]
    qenv = {**os.environ}
    return [("llama.cpp convert (bf16)", conv, env, bf16), ("llama.cpp quantize (Q4_0)", quant, qenv, q4)]


def edgeq_step(ckpt: Path, work: Path, fmt: str, extra: list[str], planned: bool = False
               ) -> tuple[str, list[str], dict, Path]:
    out = work / "out" / f"edgeq-{fmt}"
    bits = [] if planned else ["--bits", "4"]
    cmd = [sys.executable, "-m", "edgeq.cli", "build", str(ckpt), *bits, "--format", fmt,
           "-o", str(out), "--force", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    label = "edgeq build " + shlex.join([*bits, "--format", fmt, *extra])
    return label, cmd, env, out


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# ----------------------------------------------------------------------------- report


def _fmt_row(name: str, runs: list[dict]) -> str:
    ok = all(r["rc"] == 0 for r in runs)
    wall = statistics.median(r["wall_s"] for r in runs)
    size = runs[-1].get("output_mb")
    status = "ok" if ok else ", ".join(sorted({r.get("killed") or f"rc {r['rc']}" for r in runs if r["rc"] != 0}))
    cpu = statistics.median(r["user_s"] + r["sys_s"] for r in runs)
    return (f"| {name} | {wall:.1f} | {cpu:.1f} | {max(r['ru_maxrss_mb'] for r in runs) / 1e3:.2f} | "
            f"{max(r['peak_anon_mb'] for r in runs) / 1e3:.2f} | {max(r['peak_file_mb'] for r in runs) / 1e3:.2f} | "
            f"{'' if size is None else f'{size:.1f}'} | {status} |")


def markdown(result: dict) -> str:
    n, p = result["repeat"], result["params"]
    size = f"{p / 1e9:.2f} B" if p >= 1e8 else f"{p / 1e6:.2f} M"
    lines = [f"shape {result['shape']} ({size} params, checkpoint {result['ckpt_gb']:.2f} GB bf16), "
             f"{n} run{'s' if n > 1 else ''} (median wall, max memory)", "",
             "| step | wall s | CPU s | peak RSS GB (ru_maxrss) | peak anon GB | peak file-backed GB | output MB | status |",
             "|---|---|---|---|---|---|---|---|"]
    steps: dict[str, list[dict]] = {}
    for r in result["runs"]:
        steps.setdefault(r["step"], []).append(r)
    for name, runs in steps.items():
        lines.append(_fmt_row(name, runs))
    lc = [runs for name, runs in steps.items() if name.startswith("llama.cpp")]
    if len(lc) == 2:
        tot = [a["wall_s"] + b["wall_s"] for a, b in zip(*lc)]
        cpu = [a["user_s"] + a["sys_s"] + b["user_s"] + b["sys_s"] for a, b in zip(*lc)]
        lines.append(f"| **llama.cpp convert + quantize** | {statistics.median(tot):.1f} | {statistics.median(cpu):.1f} | "
                     f"{max(r['ru_maxrss_mb'] for runs in lc for r in runs) / 1e3:.2f} | "
                     f"{max(r['peak_anon_mb'] for runs in lc for r in runs) / 1e3:.2f} | "
                     f"{max(r['peak_file_mb'] for runs in lc for r in runs) / 1e3:.2f} | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.2-1b", help="models.scale shape (ignored with --ckpt)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="override the shape's depth")
    ap.add_argument("--ckpt", type=Path, default=None, help="use this checkpoint instead of generating one")
    ap.add_argument("--tokenizer", default=None, help="models.scale --tokenizer (default: SmolLM2's)")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "bench-scale",
                    help="work dir: checkpoint, sdist cache, outputs, logs")
    ap.add_argument("--formats", default="gguf", help="edgeq formats, comma-separated (gguf,onnx,tvm,reference)")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-edgeq", action="store_true")
    ap.add_argument("--planned", action="store_true",
                    help="edgeq's default planned build (GPTQ + compensation at the profile's budget) "
                         "instead of --bits 4")
    ap.add_argument("--edgeq-args", default="", help="extra arguments for edgeq build (one shell-quoted string)")
    ap.add_argument("--repeat", type=int, default=1, help="runs, interleaved A B A B")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp quantize threads")
    ap.add_argument("--mem-limit", type=float, default=None, help="cap edgeq's memory at this many GB")
    ap.add_argument("--mem-limit-method", default="auto", choices=["auto", "systemd", "cgroup2", "cgroup1", "watchdog"])
    ap.add_argument("--json", type=Path, default=None, help="write the results here (default WORK/results.json)")
    args = ap.parse_args(argv)

    from edgeq.errors import EdgeqError
    from models.scale import SHAPES, make_scale
    from models import read_marker

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    formats = [f for f in args.formats.split(",") if f]
    extra = shlex.split(args.edgeq_args)
    cap = MemCap(int(args.mem_limit * 1e9), args.mem_limit_method) if args.mem_limit else None
    if cap:
        log(f"bench: edgeq runs capped at {args.mem_limit} GB by {cap.method}")

    gen = None
    if args.ckpt:
        ckpt = args.ckpt.resolve()
        shape = ckpt.name
        marker = read_marker(ckpt) or {}
        params = marker.get("params") or 0
    else:
        if args.shape not in SHAPES:
            print(f"error: unknown shape {args.shape!r} (known: {', '.join(SHAPES)})", file=sys.stderr)
            return 1
        suffix = f"-l{args.layers}" if args.layers else ""
        ckpt = work / f"ckpt-{args.shape}{suffix}-s{args.seed}"
        marker = read_marker(ckpt)
        want_layers = args.layers or SHAPES[args.shape].layers
        if (not marker or marker.get("shape") != args.shape or marker.get("seed") != args.seed
                or marker.get("dims", {}).get("layers") != want_layers):
            t = time.perf_counter()
            try:
                make_scale(ckpt, args.shape, seed=args.seed, layers=args.layers, tokenizer=args.tokenizer, log=log)
            except EdgeqError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            gen = round(time.perf_counter() - t, 1)
            marker = read_marker(ckpt)
        shape = args.shape + suffix
        params = marker["params"]
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))

    sdist = None if args.skip_llamacpp else ensure_sdist(work)
    runs: list[dict] = []
    logs = work / "logs"
    for rep in range(args.repeat):
        if sdist is not None:
            for label, cmd, env, out in llamacpp_steps(ckpt, work, sdist, args.threads):
                r = measure(label, cmd, env, logs / f"{rep}-{label.split()[1]}.log")
                r["repeat"], r["output_mb"] = rep, round(du(out) / MB, 1)
                runs.append(r)
                if r["rc"] != 0:
                    break
        if not args.skip_edgeq:
            for fmt in formats:
                label, cmd, env, out = edgeq_step(ckpt, work, fmt, extra, planned=args.planned)
                r = measure(label, cmd, env, logs / f"{rep}-edgeq-{fmt}.log", cap)
                r["repeat"], r["output_mb"] = rep, round(du(out) / MB, 1)
                runs.append(r)

    result = {
        "shape": shape, "ckpt": str(ckpt), "params": params, "ckpt_gb": ckpt_bytes / 1e9,
        "generate_s": gen, "repeat": args.repeat, "edgeq_args": extra, "formats": formats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)},
        "mem_limit": {"gb": args.mem_limit, "method": cap.method} if cap else None,
        "runs": runs,
    }
    path = args.json or work / "results.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))
    log(f"bench: wrote {path}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
