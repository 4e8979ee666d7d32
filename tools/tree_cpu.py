"""CPU seconds (user + sys) of process trees: every live descendant of the given pids, with what
their reaped children used (/proc/PID/stat utime, stime, cutime, cstime). For a Ray cluster
started with `ray start --block` (raylet, workers: descendants of that process), run it before
and after a build: the difference is the CPU the cluster spent on the build.

    python tools/tree_cpu.py PID [PID ...]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def stat(pid: int) -> tuple[int, list[str]]:
    s = Path(f"/proc/{pid}/stat").read_text()
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[1]), rest  # (ppid, fields from state on)


def tree_cpu(roots: set[int]) -> float:
    hz = os.sysconf("SC_CLK_TCK")
    parents, ticks = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid, f = stat(int(d.name))
            except (OSError, ValueError):
                continue
            parents[int(d.name)] = ppid
            ticks[int(d.name)] = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    total = 0
    for pid, t in ticks.items():
        p = pid
        while p > 1 and p not in roots:
            p = parents.get(p, 1)
        if p in roots:
            total += t
    return total / hz


if __name__ == "__main__":
    print(f"{tree_cpu({int(a) for a in sys.argv[1:]}):.1f}")
