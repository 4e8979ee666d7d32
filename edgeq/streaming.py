"""Bounded-memory writing: row ranges of a large tensor, and a file filled region by region.

A streaming writer knows every tensor's size before it computes any of them, lays the file out
(header, offsets, padding), then writes each tensor (or each row chunk of a large one) at its
offset as it is produced and drops it. :class:`RegionFile` does the bookkeeping: it refuses a
write outside a declared region or over bytes already written, and on close checks that every
region was filled exactly (gaps are the zero padding a pre-sized file already holds).
"""
from __future__ import annotations

import os
from collections import deque
from contextlib import contextmanager
from contextvars import ContextVar
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError

# Values per row chunk when a large tensor is streamed (~4M values: 16 MB in float32; int-group
# quantization (edgeq.quant.intgroup.rtn_int) peaks at ~60 bytes per value: ~0.25 GB), so a
# vocabulary-sized matrix or an 8B model's MLP never sits in memory whole.
STREAM_CHUNK_VALUES = 1 << 22


def row_ranges(rows: int, row_values: int, multiple: int = 1):
    """``[start, stop)`` row ranges covering ``rows`` rows of ``row_values`` values each, about
    :data:`STREAM_CHUNK_VALUES` values per range; every range but the last is a multiple of
    ``multiple`` rows (a blocked layout's row block)."""
    step = max(1, STREAM_CHUNK_VALUES // max(1, int(row_values)))
    step = max(multiple, step - step % multiple)
    for r0 in range(0, int(rows), step):
        yield r0, min(int(rows), r0 + step)


_LAYER_WORKERS: ContextVar[int] = ContextVar("edgeq_layer_workers", default=1)


def layer_workers() -> int:
    """Threads a pass may use for independent per-layer work (e.g. one layer's sort scores per
    thread): 1 unless the caller, which knows the memory one layer's work needs, allowed more
    (:func:`allow_layer_workers`). Results never depend on it (each layer's work is the same
    computation, BLAS held to one thread: edgeq.blas)."""
    return _LAYER_WORKERS.get()


@contextmanager
def allow_layer_workers(n: int):
    token = _LAYER_WORKERS.set(max(1, int(n)))
    try:
        yield
    finally:
        _LAYER_WORKERS.reset(token)


def worker_threads() -> int:
    """edgeq's own worker threads: ``$EDGEQ_THREADS`` when set (> 0), else the CPU count, at most 4."""
    env = os.environ.get("EDGEQ_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise EdgeqError(f"EDGEQ_THREADS: expected a whole number of threads, got {env!r}") from None
        if n > 0:
            return n
    return max(1, min(4, os.cpu_count() or 1))


def ordered_map(fn, items, workers: int | None = None):
    """``fn(item)`` for each item, yielded in order, computed by up to ``workers`` threads (default:
    :func:`worker_threads`) with at most ``workers`` results ahead of the consumer: while the
    consumer holds one result, at most ``workers - 1`` others are computed or waiting, so memory
    stays bounded by a few chunks (provided the consumer drops each result before it asks for
    the next). For numpy-heavy chunk work (ufuncs and BLAS release the GIL); the results do not
    depend on the thread count."""
    workers = max(1, worker_threads() if workers is None else int(workers))
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as ex:
        pending = deque()
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class RegionFile:
    """A file of ``size`` bytes (zero-filled) whose named regions are written in any order."""

    def __init__(self, path: str | Path, size: int, regions: dict[str, tuple[int, int]]):
        """``regions``: name -> (offset, length) in the file."""
        self.path = Path(path)
        self.regions = dict(regions)
        self._done: dict[str, list[tuple[int, int]]] = {n: [] for n in self.regions}
        self._f = open(self.path, "wb")
        self._f.truncate(int(size))

    def write(self, name: str, data: np.ndarray, at: int = 0) -> None:
        """Write ``data``'s bytes (C order) at byte ``at`` of region ``name``."""
        if name not in self.regions:
            raise EdgeqError(f"{self.path.name}: no region {name!r}")
        off, length = self.regions[name]
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        end = at + buf.nbytes
        if at < 0 or end > length:
            raise EdgeqError(f"{self.path.name}: {name}: bytes [{at}, {end}) outside its {length} bytes")
        done = self._done[name]
        if any(a < end and at < b for a, b in done):
            raise EdgeqError(f"{self.path.name}: {name}: bytes [{at}, {end}) written twice")
        self._f.seek(off + at)
        self._f.write(memoryview(buf))
        done.append((at, end))

    def missing(self) -> list[str]:
        """Regions not (completely) written yet."""
        return [n for n, (_, length) in self.regions.items() if sum(b - a for a, b in self._done[n]) != length]

    def close(self) -> None:
        """Close; raises if a region was left incomplete."""
        if self._f.closed:
            return
        self._f.close()
        missing = self.missing()
        if missing:
            raise EdgeqError(f"{self.path.name}: {len(missing)} tensors not written, e.g. {missing[0]}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:  # keep the original error; the caller's temp dir is discarded
            self._f.close()
            return False
        self.close()
        return False
