"""The backend registry: format name -> Backend. Everything that used to list format names asks it."""
from __future__ import annotations

from edgeq.backends.base import Backend
from edgeq.errors import EdgeqError

_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add ``backend`` under ``backend.name``; a name registered twice is an error."""
    if not backend.name:
        raise EdgeqError(f"{type(backend).__name__}: a backend needs a name")
    if backend.name in _BACKENDS:
        raise EdgeqError(f"backend {backend.name!r} is registered twice "
                         f"({type(_BACKENDS[backend.name]).__name__} and {type(backend).__name__})")
    if backend.runtime not in backend.runtimes:
        raise EdgeqError(f"backend {backend.name!r}: its runtime {backend.runtime!r} is not in its runtimes")
    _BACKENDS[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    """Remove a backend (tests that register a throwaway one)."""
    _BACKENDS.pop(name, None)


def names() -> tuple[str, ...]:
    """Every format, in registration order (the order of CLI choices and messages)."""
    return tuple(_BACKENDS)


def backends() -> tuple[Backend, ...]:
    return tuple(_BACKENDS.values())


def find(name: str | None) -> Backend | None:
    return _BACKENDS.get(name) if isinstance(name, str) else None


def get(name: str | None) -> Backend:
    """The backend for format ``name``; an unknown name is an ``EdgeqError`` listing the available ones."""
    b = find(name)
    if b is None:
        raise EdgeqError(f"unknown format {name!r} (available: {', '.join(_BACKENDS)})")
    return b


def for_manifest(manifest: dict) -> Backend:
    return get(manifest.get("format"))


def target_formats() -> tuple[str, ...]:
    """The formats a target profile may list (``deploy.formats``): all but those built for every target."""
    return tuple(n for n, b in _BACKENDS.items() if not b.on_every_target)


def runtimes() -> tuple[str, ...]:
    """``auto`` and every runtime a backend opens artifacts with: each format's own runtime in
    registration order, then the other runtimes they accept."""
    out = ["auto"]
    for b in _BACKENDS.values():
        if b.runtime not in out:
            out.append(b.runtime)
    for b in _BACKENDS.values():
        out += [r for r in b.runtimes if r not in out]
    return tuple(out)


def for_runtime(runtime: str) -> Backend | None:
    """The backend whose own runtime is ``runtime`` (a runtime id, or a session's ``name``), if any."""
    return next((b for b in _BACKENDS.values() if runtime in (b.runtime, b.session_name)), None)


def int8_runtimes() -> tuple[str, ...]:
    """Runtimes that run quantized weights through int8 dot products (roofline compute peaks)."""
    out: list[str] = []
    for b in _BACKENDS.values():
        out += [r for r in b.int8_runtimes if r not in out]
    return tuple(out)
