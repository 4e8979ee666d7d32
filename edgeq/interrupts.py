"""Places where a Ctrl-C / SIGTERM must not be raised: Python code that C calls back into.

An exception raised inside a ctypes callback (llama.cpp's log callback, say) cannot travel back
through the C frames: ctypes prints it as "Exception ignored on calling ctypes callback
function", drops it, and the build runs on as if no signal had come (seen in CI). Callbacks
register their code here with ``@no_raise_here``; the CLI's signal handler sends the signal again
a moment later when it finds it interrupted one of them, so the exception lands in ordinary code.
"""
from __future__ import annotations

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
