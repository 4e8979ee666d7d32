"""Places where a Ctrl-C / SIGTERM must not be raised: Python code that C calls back into.

An exception raised inside a ctypes callback (llama.cpp's log callback, say) cannot travel back
through the C frames: ctypes prints it as "Exception ignored on calling ctypes callback
function", drops it, and the build runs on as if no signal had come (seen in CI). Callbacks
register their code here with ``@no_raise_here``; the CLI's signal handler sends the signal again
a moment later when it finds it interrupted one of them, so the exception lands in ordinary code.

And the opposite: a few steps must happen together or not at all (a temporary directory created
and its path recorded for the cleanup; a swap of two renames): ``deferred_signals`` holds a
signal until such a block ends, and ``make_temp_dir`` / ``make_temp_file`` use it, so a signal
can never leave a temporary entry that no cleanup knows about.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

_NO_RAISE: set = set()  # code objects of registered callbacks


def no_raise_here(fn):
    """Mark ``fn`` (a function C calls back into) as a place a signal handler must not raise."""
    _NO_RAISE.add(fn.__code__)
    return fn


def must_not_raise_in(frame) -> bool:
    """Whether the interrupted ``frame`` is a registered callback or the import system (whose
    weakref callbacks drop exceptions the same way)."""
    if frame is None:
        return False
    code = frame.f_code
    return code.co_filename.startswith("<frozen importlib") or any(code is c for c in _NO_RAISE)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block ends, then deliver them (main thread only: Python
    runs signal handlers there; elsewhere the block runs unguarded). For the few steps that must
    happen together or not at all: creating a temporary directory and recording where it is (so
    the cleanup knows it), entering a context whose exit removes it, a swap of two renames."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None:  # installed outside Python: leave it alone
            continue
        saved[sig] = handler
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in pending:
            signal.raise_signal(sig)


def make_temp_dir(prefix: str, dir: str | Path | None = None) -> Path:
    """``tempfile.mkdtemp`` whose directory cannot leak to a signal: a Ctrl-C / SIGTERM arriving
    while it runs is delivered once the directory exists and is removed again, so the caller
    either gets the path (and owns its cleanup) or gets the interrupt and no directory."""
    path = None
    try:
        with deferred_signals():
            path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    except BaseException:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def make_temp_file(prefix: str, suffix: str, dir: str | Path) -> Path:
    """``tempfile.mkstemp`` (closed) with the same guarantee as :func:`make_temp_dir`."""
    path = None
    try:
        with deferred_signals():
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)
            os.close(fd)
            path = Path(name)
    except BaseException:
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return path
