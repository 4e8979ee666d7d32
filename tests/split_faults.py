"""A quantize task that kills the worker it lands on, once (tests of edgeq.pipeline.split's retries).

:class:`DiesOnce` is a :class:`~edgeq.quant.linear_task.LinearJob` that pickles as a call of
:func:`job_or_die`: unpickled in a worker (a process pool's or Ray's), the first time it SIGKILLs
that worker (writing ``marker`` first), later it is the plain job. :class:`KindDiesOnce` does the
same for a calibration shard task (its accumulator kind, a string). (Importable as
``split_faults``: tests/conftest.py puts this directory on sys.path; Ray workers need it pickled
by value.)"""
from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

from edgeq.quant.linear_task import LinearJob


def job_or_die(marker: str, job: LinearJob) -> LinearJob:
    if not Path(marker).exists():
        Path(marker).write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return job


@dataclasses.dataclass(frozen=True)
class DiesOnce(LinearJob):
    marker: str = ""

    @classmethod
    def of(cls, job: LinearJob, marker: Path) -> "DiesOnce":
        return cls(**dataclasses.asdict(job), marker=str(marker))

    def __reduce__(self):
        plain = LinearJob(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LinearJob)})
        return job_or_die, (self.marker, plain)


def kind_or_die(marker: str, kind: str) -> str:
    return job_or_die(marker, kind)


class KindDiesOnce(str):
    """A calibration shard's kind ("stats") that kills the worker unpickling it, once."""

    marker: str = ""

    @classmethod
    def of(cls, kind: str, marker: Path) -> "KindDiesOnce":
        k = cls(kind)
        k.marker = str(marker)
        return k

    def __reduce__(self):
        return kind_or_die, (self.marker, str(self))
