"""edgeq.targets_table: the ``edgeq targets`` table."""
from __future__ import annotations

import re

from edgeq.targets import list_targets
from edgeq.targets_table import format_targets_table


def test_table_contains_every_profile():
    profiles = list_targets()
    table = format_targets_table(profiles)
    lines = table.splitlines()
    assert len(lines) == 2 + len(profiles)
    assert lines[0].split()[:2] == ["name", "kind"]
    assert set(lines[1]) <= {"-", " "}
    for p, line in zip(profiles, lines[2:]):
        assert line.startswith(p.name + " ")
        assert p.kind.value in line
        assert ",".join(f.value for f in p.formats) in line
        assert str(p.prune_granularity) in line
    # Fixed width: every column starts at the same offset in every row.
    starts = [m.start() for m in re.finditer(r"(?<=  )\S", lines[1])]
    for line in lines[2:]:
        for s in starts:
            assert line[s - 1] == " "


def test_table_of_nothing_is_just_the_header():
    assert len(format_targets_table([]).splitlines()) == 2
