"""edgeq.interrupts: a Ctrl-C / SIGTERM arriving while a temporary entry is created is delivered
once the entry is recorded (or removed again), so no signal leaves a temporary entry that no
cleanup knows about (CI once found a stray ``.prev.tmp-*`` after a SIGINT at a random point)."""
from __future__ import annotations

import signal
import tempfile
import threading

import pytest

from edgeq.interrupts import deferred_signals, make_temp_dir, make_temp_file


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler, whatever an earlier test left installed."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _interrupt_self():
    # to the main thread itself: the handler runs as pthread_kill returns
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


@pytest.mark.parametrize("make,real_name", [(make_temp_dir, "mkdtemp"), (make_temp_file, "mkstemp")])
def test_a_signal_right_after_the_entry_is_created_leaves_nothing(make, real_name, tmp_path, monkeypatch,
                                                                  default_sigint):
    real = getattr(tempfile, real_name)
    made = []

    def creating_then_interrupted(*a, **kw):
        r = real(*a, **kw)
        made.append(r)
        _interrupt_self()  # after the entry exists, before the caller has its path
        return r

    monkeypatch.setattr(tempfile, real_name, creating_then_interrupted)
    args = (".x.",) if make is make_temp_dir else (".x.", ".tmp")
    with pytest.raises(KeyboardInterrupt):
        make(*args, tmp_path)
    assert made and list(tmp_path.iterdir()) == []  # the interrupt came, and took the entry with it


def test_without_a_signal_the_caller_owns_the_entry(tmp_path):
    d = make_temp_dir(".d.", tmp_path)
    f = make_temp_file(".f.", ".tmp", tmp_path)
    assert d.is_dir() and d.name.startswith(".d.") and f.is_file() and f.name.endswith(".tmp")


def test_deferred_signals_delivers_once_after_the_block(default_sigint):
    order = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_signals():
            _interrupt_self()
            order.append("block went on")
    assert order == ["block went on"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
