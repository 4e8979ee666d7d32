"""Row ranges for streamed tensors and the region-by-region file writer."""
from __future__ import annotations

import numpy as np
import pytest

from edgeq import streaming
from edgeq.errors import EdgeqError
from edgeq.streaming import RegionFile, row_ranges


def test_row_ranges_cover_every_row_once(monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_CHUNK_VALUES", 100)
    got = list(row_ranges(23, 10))
    assert got == [(0, 10), (10, 20), (20, 23)]
    got = list(row_ranges(50, 10, multiple=4))  # 10 rows per chunk rounded down to 8
    assert got[:-1] == [(r, r + 8) for r in range(0, 48, 8)] and got[-1] == (48, 50)
    assert list(row_ranges(5, 1000, multiple=4)) == [(0, 4), (4, 5)]  # at least one block per chunk
    assert list(row_ranges(0, 10)) == []


def test_region_file_any_order_zero_padding(tmp_path):
    p = tmp_path / "f.bin"
    with RegionFile(p, 12, {"a": (0, 4), "b": (8, 4)}) as f:
        f.write("b", np.array([5, 6], np.uint8), at=2)
        f.write("a", np.array([1, 2, 3, 4], np.uint8))
        f.write("b", np.array([7, 8], np.uint8))
    assert p.read_bytes() == bytes([1, 2, 3, 4, 0, 0, 0, 0, 7, 8, 5, 6])


def test_region_file_refuses_bad_writes(tmp_path):
    f = RegionFile(tmp_path / "f.bin", 8, {"a": (0, 4), "b": (4, 4)})
    with pytest.raises(EdgeqError, match="outside"):
        f.write("a", np.zeros(5, np.uint8))
    f.write("a", np.zeros(2, np.uint8), at=1)
    with pytest.raises(EdgeqError, match="twice"):
        f.write("a", np.zeros(2, np.uint8), at=2)
    with pytest.raises(EdgeqError, match="no region"):
        f.write("c", np.zeros(1, np.uint8))
    assert f.missing() == ["a", "b"]
    with pytest.raises(EdgeqError, match="not written"):
        f.close()


def test_ordered_map_keeps_order_and_bounds_the_work_ahead():
    """Results come back in input order whatever the thread count, and no more than ``workers``
    items are computed ahead of the consumer (memory stays a few chunks)."""
    import threading
    import time

    from edgeq.streaming import ordered_map

    started, lock = [], threading.Lock()

    def fn(i):
        with lock:
            started.append(i)
        time.sleep(0.002 * (7 - i % 7))  # later items finish first
        return i * i

    for workers in (1, 2, 3):
        started.clear()
        seen = []
        for i, r in zip(range(40), ordered_map(fn, range(40), workers=workers)):
            assert r == i * i
            with lock:
                assert max(started) <= i + workers  # at most `workers` beyond the one consumed
            seen.append(r)
        assert seen == [i * i for i in range(40)]


def test_worker_threads_follow_edgeq_threads(monkeypatch):
    import os

    from edgeq.streaming import worker_threads

    monkeypatch.setenv("EDGEQ_THREADS", "3")
    assert worker_threads() == 3
    monkeypatch.setenv("EDGEQ_THREADS", "0")  # (0 or unset: the CPU count, at most 4)
    assert worker_threads() == max(1, min(4, os.cpu_count() or 1))
    monkeypatch.delenv("EDGEQ_THREADS")
    assert worker_threads() == max(1, min(4, os.cpu_count() or 1))
    monkeypatch.setenv("EDGEQ_THREADS", "two")
    with pytest.raises(EdgeqError, match="EDGEQ_THREADS"):
        worker_threads()


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ordered_map_keeps_order_and_at_most_workers_ahead(workers):
    """Results in item order; while the consumer holds one, at most ``workers - 1`` others exist."""
    import threading

    from edgeq.streaming import ordered_map

    lock, live, peak = threading.Lock(), [0], [0]

    def fn(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return i * i

    got = []
    for r in ordered_map(fn, range(20), workers):
        got.append(r)
        with lock:
            live[0] -= 1  # (the consumer is done with it)
    assert got == [i * i for i in range(20)]
    assert peak[0] <= workers
