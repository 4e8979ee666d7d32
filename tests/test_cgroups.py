"""edgeq.cgroups: the room memory cgroups leave a process, on fake /proc + /sys trees laid out as
the kernel does (cgroup v1 hybrid as on this machine, pure v2, nested limits, namespaces)."""
from __future__ import annotations

from pathlib import Path

from edgeq.cgroups import memory_room

GiB = 1 << 30
V1_UNLIMITED = "9223372036854771712"

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_MOUNTINFO = "30 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def _write(d: Path, **files: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name.replace("__", ".")).write_text(text)


def _v1(d: Path, limit: str, usage: int, inactive: int = 0, active: int = 0) -> None:
    # the cgroup's own counters (no total_ prefix) differ from the subtree's: only total_ counts
    _write(d, memory__limit_in_bytes=limit, memory__usage_in_bytes=str(usage),
           memory__stat=f"cache 0\nactive_file 7\ninactive_file 5\ntotal_active_file {active}\n"
                        f"total_inactive_file {inactive}\n")


def _v2(d: Path, limit: str, usage: int, inactive: int = 0, active: int = 0) -> None:
    _write(d, memory__max=limit, memory__current=str(usage),
           memory__stat=f"anon 0\nactive_file {active}\ninactive_file {inactive}\n")


def test_v1_limit_on_a_hybrid_host(tmp_path):
    mem = tmp_path / "sys/fs/cgroup/memory"
    _v1(mem, V1_UNLIMITED, 10 * GiB)
    _v1(mem / "jobs", V1_UNLIMITED, 2 * GiB)
    _v1(mem / "jobs/build", str(3 * GiB), 2 * GiB, inactive=GiB // 2, active=GiB // 4)
    cg = "5:memory:/jobs/build\n4:cpu:/\n0::/\n"
    # limit - (usage - page cache)
    assert memory_room(tmp_path, cg, HYBRID_MOUNTINFO) == 3 * GiB - 2 * GiB + GiB // 2 + GiB // 4


def test_v1_unlimited_is_none(tmp_path):
    _v1(tmp_path / "sys/fs/cgroup/memory/jobs", V1_UNLIMITED, GiB)
    _v1(tmp_path / "sys/fs/cgroup/memory", V1_UNLIMITED, GiB)
    assert memory_room(tmp_path, "5:memory:/jobs\n0::/\n", HYBRID_MOUNTINFO) is None


def test_v2_the_smallest_room_over_the_ancestors(tmp_path):
    root = tmp_path / "sys/fs/cgroup"
    _v2(root / "user.slice", str(4 * GiB), 3 * GiB)           # parent: 1 GiB left
    _v2(root / "user.slice/build.scope", "max", 3 * GiB)      # the process's own: no limit
    assert memory_room(tmp_path, "0::/user.slice/build.scope\n", V2_MOUNTINFO) == GiB


def test_v2_page_cache_counts_as_free(tmp_path):
    _v2(tmp_path / "sys/fs/cgroup/a", str(8 * GiB), 7 * GiB, inactive=3 * GiB, active=GiB)
    assert memory_room(tmp_path, "0::/a\n", V2_MOUNTINFO) == 5 * GiB


def test_v2_over_the_limit_is_zero_room(tmp_path):
    _v2(tmp_path / "sys/fs/cgroup/a", str(GiB), 2 * GiB)
    assert memory_room(tmp_path, "0::/a\n", V2_MOUNTINFO) == 0


def test_cgroup_namespace_uses_the_mount_point(tmp_path):
    # inside a container: the mount's root is the container's cgroup, /proc/self/cgroup says "/"
    mi = "30 23 0:27 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    _v2(tmp_path / "sys/fs/cgroup", str(2 * GiB), GiB)
    assert memory_room(tmp_path, "0::/\n", mi) == GiB


def test_bind_mounted_subtree_resolves_relative_to_its_root(tmp_path):
    mi = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
    _v1(tmp_path / "sys/fs/cgroup/memory/inner", str(2 * GiB), GiB)
    _v1(tmp_path / "sys/fs/cgroup/memory", V1_UNLIMITED, GiB)
    assert memory_room(tmp_path, "7:memory:/docker/abc/inner\n", mi) == GiB


def test_both_hierarchies_the_smaller_wins(tmp_path):
    _v1(tmp_path / "sys/fs/cgroup/memory/j", str(6 * GiB), GiB)
    _v2(tmp_path / "sys/fs/cgroup/unified/j", str(3 * GiB), GiB)
    assert memory_room(tmp_path, "5:memory:/j\n0::/j\n", HYBRID_MOUNTINFO) == 2 * GiB


def test_nothing_readable_is_none(tmp_path):
    assert memory_room(tmp_path, "5:memory:/j\n0::/j\n", HYBRID_MOUNTINFO) is None
    assert memory_room(tmp_path / "no-such-root") is None
    assert memory_room(tmp_path, "garbage\n", "garbage\n") is None


def test_escaped_mount_points(tmp_path):
    mi = "30 23 0:27 / /sys/fs/my\\040cgroup rw - cgroup2 cgroup2 rw\n"
    _v2(tmp_path / "sys/fs/my cgroup/a", str(2 * GiB), GiB)
    assert memory_room(tmp_path, "0::/a\n", mi) == GiB
