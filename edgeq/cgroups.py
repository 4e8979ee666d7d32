"""How much memory the Linux control groups around this process leave it.

A container or a ``systemd-run -p MemoryMax=`` scope limits a process below the machine's
``MemAvailable``; a build that only looked at the machine would start a step the kernel then
kills. :func:`memory_room` finds this process's memory cgroup — cgroup v2 (``memory.max``) and
cgroup v1 (``memory.limit_in_bytes``, still the hierarchy of many Docker hosts), each through
``/proc/self/cgroup`` and the mount point ``/proc/self/mountinfo`` gives, so hybrid layouts such
as ``/sys/fs/cgroup/memory`` + ``/sys/fs/cgroup/unified`` are found — and returns the smallest
room left under any limit on the way to the root: ``limit - (usage - file pages)``. Page cache
(``active_file`` + ``inactive_file``: the checkpoint a build has read, the memory-mapped weights
it runs) is charged to the cgroup but reclaimed under its limit rather than ending in an OOM
kill, so it does not count as used — as the build's estimates leave memory-mapped files out.
``None`` when no limit applies or nothing can be read.
"""
from __future__ import annotations

from pathlib import Path

# cgroup v1 writes "no limit" as the largest page-aligned int64 (9223372036854771712).
_V1_UNLIMITED = 1 << 62


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(fs type, mount root, mount point, super options) of every cgroup mount."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        a, b = left.split(), right.split()
        if len(a) < 5 or len(b) < 3 or b[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((b[0], _unescape(a[3]), _unescape(a[4]), set(b[2].split(","))))
    return out


def _file_pages(path: Path, prefix: str) -> int:
    """``{prefix}active_file + {prefix}inactive_file`` of a memory.stat file (0 when unreadable)."""
    try:
        fields = dict(line.split()[:2] for line in path.read_text().splitlines() if line.strip())
        return sum(int(fields.get(f"{prefix}{k}", 0)) for k in ("active_file", "inactive_file"))
    except (OSError, ValueError):
        return 0


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _levels(mount_point: str, mount_root: str, cg_path: str, fs_root: Path) -> list[Path]:
    """The cgroup's directory and its ancestors up to the mount point (innermost first)."""
    base = fs_root / mount_point.lstrip("/")
    root = mount_root.rstrip("/") or "/"
    if root != "/" and (cg_path == root or cg_path.startswith(root + "/")):
        rel = cg_path[len(root):]
    elif root == "/":
        rel = cg_path
    else:  # a cgroup namespace or a bind mount of another subtree: the mount point is ours
        rel = ""
    parts = [p for p in rel.split("/") if p]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _room_v1(d: Path) -> int | None:
    limit = _read_int(d / "memory.limit_in_bytes")
    usage = _read_int(d / "memory.usage_in_bytes")
    if limit is None or usage is None or limit >= _V1_UNLIMITED:
        return None
    return limit - (usage - _file_pages(d / "memory.stat", "total_"))  # total_: the subtree, as usage


def _room_v2(d: Path) -> int | None:
    limit = _read_int(d / "memory.max")
    usage = _read_int(d / "memory.current")
    if limit is None or usage is None:
        return None
    return limit - (usage - _file_pages(d / "memory.stat", ""))


def memory_room(fs_root: Path | str = "/", proc_cgroup: str | None = None,
                mountinfo: str | None = None) -> int | None:
    """Bytes this process may still use under its memory cgroups' limits (the smallest over every
    level of v1 and v2), or None when no limit applies. ``fs_root`` / ``proc_cgroup`` /
    ``mountinfo`` stand in for ``/``, ``/proc/self/cgroup`` and ``/proc/self/mountinfo`` (tests)."""
    fs_root = Path(fs_root)
    try:
        if proc_cgroup is None:
            proc_cgroup = (fs_root / "proc/self/cgroup").read_text()
        if mountinfo is None:
            mountinfo = (fs_root / "proc/self/mountinfo").read_text()
    except OSError:
        return None
    mounts = _mounts(mountinfo)
    rooms: list[int] = []
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, cg_path = parts
        if hier == "0" and controllers == "":
            found = [(m[1], m[2]) for m in mounts if m[0] == "cgroup2"]
            room_of = _room_v2
        elif "memory" in controllers.split(","):
            found = [(m[1], m[2]) for m in mounts if m[0] == "cgroup" and "memory" in m[3]]
            room_of = _room_v1
        else:
            continue
        for mount_root, mount_point in found[:1]:
            for d in _levels(mount_point, mount_root, cg_path, fs_root):
                r = room_of(d)
                if r is not None:
                    rooms.append(max(r, 0))
    return min(rooms) if rooms else None
