"""CPU seconds (user + sys) of process trees: every live descendant of the given pids.

    python tools/tree_cpu.py PID [PID ...]              # now: utime+stime+cutime+cstime, summed
    python tools/tree_cpu.py --until FILE PID [PID ...]  # poll every 0.5 s until FILE exists; each
                                                         # process's last utime+stime, summed

For a Ray cluster started with `ray start --block` (raylet, workers: descendants of that process)
run the first form before a build and the second during it (touch FILE when the build ends): the
difference is the CPU the cluster spent on the build. Polling is needed because a job's workers
exit with the job and the raylet does not account them as reaped children.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def stat(pid: int) -> tuple[int, list[str]]:
    s = Path(f"/proc/{pid}/stat").read_text()
    rest = s[s.rindex(")") + 2:].split()
    return int(rest[1]), rest  # (ppid, fields from state on)


def tree_ticks(roots: set[int], fields: slice) -> dict[int, int]:
    parents, ticks = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid, f = stat(int(d.name))
            except (OSError, ValueError):
                continue
            parents[int(d.name)] = ppid
            ticks[int(d.name)] = sum(int(x) for x in f[fields])
    out = {}
    for pid, t in ticks.items():
        p = pid
        while p > 1 and p not in roots:
            p = parents.get(p, 1)
        if p in roots:
            out[pid] = t
    return out


def tree_cpu(roots: set[int]) -> float:
    return sum(tree_ticks(roots, slice(11, 15)).values()) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def watch(roots: set[int], until: Path) -> float:
    last: dict[int, int] = {}
    while not until.exists():
        last.update(tree_ticks(roots, slice(11, 13)))  # utime stime
        time.sleep(0.5)
    return sum(last.values()) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--until"]:
        print(f"{watch({int(a) for a in args[2:]}, Path(args[1])):.1f}")
    else:
        print(f"{tree_cpu({int(a) for a in args}):.1f}")
