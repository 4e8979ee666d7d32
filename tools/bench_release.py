"""A release matrix against the single builds it replaces, run one after the other on this machine:
wall time, CPU seconds (user + sys of the build and its children) and peak RSS of each, and every
matrix artifact compared byte for byte with its single build.

    python tools/bench_release.py --model models/cache/smollm2-135m-instruct --work /tmp/rel \\
        --json /tmp/rel/result.json -- --prune-rates 0,0.15,0.25,0.35 --calib-samples 8 --calib-len 64

Arguments after ``--`` go to every build unchanged. ``--targets`` (default ``all``: the six profiles)
picks the matrix; each single build is ``edgeq build MODEL --target T ARGS -o WORK/single-T`` and
the matrix ``edgeq build MODEL --target T1,T2,... ARGS -o WORK/matrix``. Runs are sequential (no
two builds compete for the cores): the wall-time ratio is matrix / sum of singles.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.hashing import sha256_file  # noqa: E402
from edgeq.release import parse_targets  # noqa: E402


def timed_build(cmd: list[str], log: Path) -> dict:
    """Run one build as a child; its wall, CPU (user + sys, children included) and peak RSS."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise SystemExit(f"error: {' '.join(cmd)} exited {code}: {' | '.join(tail)}")
    # wait4's rusage covers the child and its reaped descendants (worker processes included)
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "max_rss_mib": round(usage.ru_maxrss / 1024)}


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}\0{sha256_file(p)}\n".encode())  # streamed: GGUFs of GBs
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--targets", default="all", help="as edgeq build --target (default: every profile)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("build_args", nargs="*", help="after --: passed to every build")
    a = ap.parse_args(argv)
    try:
        targets = parse_targets(a.targets)
    except EdgeqError as exc:
        raise SystemExit(f"error: {exc}") from None
    edgeq = [sys.executable, "-m", "edgeq.cli"]
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    runs = {}
    print(f"matrix of {len(targets)} targets", flush=True)
    runs["matrix"] = timed_build(edgeq + ["build", a.model, "--target", ",".join(targets), *a.build_args,
                                          "-o", str(a.work / "matrix")], a.work / "matrix.log")
    print(f"  {runs['matrix']}", flush=True)
    index = json.loads((a.work / "matrix" / "release.json").read_text())
    identical = {}
    for t in targets:
        print(f"single {t}", flush=True)
        out = a.work / f"single-{t}"
        runs[t] = timed_build(edgeq + ["build", a.model, "--target", t, *a.build_args, "-o", str(out)],
                              a.work / f"single-{t}.log")
        print(f"  {runs[t]}", flush=True)
        matrix_dirs = [d for d in (a.work / "matrix").iterdir() if d.name.startswith(f"{t}-")]
        identical[t] = len(matrix_dirs) == 1 and tree_digest(matrix_dirs[0]) == tree_digest(out)
    singles_wall = sum(runs[t]["wall_s"] for t in targets)
    singles_cpu = sum(runs[t]["cpu_s"] for t in targets)
    result = {
        "model": str(a.model), "targets": targets, "build_args": a.build_args, "runs": runs,
        "shared_steps": index.get("shared_steps"),
        "sum_singles_wall_s": round(singles_wall, 1), "sum_singles_cpu_s": round(singles_cpu, 1),
        "matrix_over_singles_wall": round(runs["matrix"]["wall_s"] / singles_wall, 3),
        "matrix_over_singles_cpu": round(runs["matrix"]["cpu_s"] / singles_cpu, 3),
        "byte_identical": identical, "load_avg": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
