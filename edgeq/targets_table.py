"""``edgeq targets``: the profiles as a fixed-width text table."""
from __future__ import annotations

from typing import Iterable

from edgeq.targets import TargetProfile


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:g}" if v < 100 else f"{v:.0f}"


def _join_capped(items: Iterable[str], limit: int = 40) -> str:
    """Comma-join ``items``; past ``limit`` characters, end with ``+N`` for the ones left out."""
    items = list(items)
    out: list[str] = []
    for i, item in enumerate(items):
        rest = len(items) - i - 1
        candidate = ",".join([*out, item])
        suffix = f",+{rest}" if rest else ""
        if out and len(candidate) + len(suffix) > limit:
            return ",".join(out) + f",+{len(items) - i}"
        out.append(item)
    return ",".join(out)


def format_targets_table(profiles: Iterable[TargetProfile]) -> str:
    """A fixed-width text table of profiles, one row each."""
    header = (
        "name", "kind", "budget GiB", "BW GB/s", "fp16 TFLOPS", "int8 TOPS",
        "ISA", "formats", "quant types", "block", "prune",
    )
    right = {2, 3, 4, 5, 9, 10}  # numeric columns
    rows = [
        (
            p.name,
            p.kind.value,
            f"{p.memory_budget_gib:g}",
            _num(p.bandwidth_gb_s),
            _num(p.peak_fp16_tflops),
            _num(p.peak_int8_tops),
            _join_capped(p.isa_features),
            ",".join(f.value for f in p.formats),
            ",".join(p.quant_types),
            str(p.quant_block_size),
            str(p.prune_granularity),
        )
        for p in profiles
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
