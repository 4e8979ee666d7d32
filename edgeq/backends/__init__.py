"""Backends: one package per artifact format, one registry entry each.

``edgeq/backends/<name>/`` holds the format's lowering (ModelIR -> payload files) and its
``backend.py``, a :class:`~edgeq.backends.base.Backend` that validates options, fills defaults
from the target profile, lowers, owns its manifest section and opens sessions on its artifacts.
The lines at the bottom are the registry entries; the order is the order of CLI choices and
messages. docs/architecture.md ("Adding a backend") walks through adding one.
"""
from edgeq.backends.base import Backend, switchable_prune_section
from edgeq.backends.registry import (
    backends,
    find,
    for_manifest,
    for_runtime,
    get,
    int8_runtimes,
    names,
    register,
    runtimes,
    target_formats,
    unregister,
)
from edgeq.backends.gguf.backend import GgufBackend
from edgeq.backends.onnx.backend import OnnxBackend
from edgeq.backends.tvm.backend import TvmBackend
from edgeq.backends.reference.backend import ReferenceBackend

__all__ = ["Backend", "backends", "find", "for_manifest", "for_runtime", "get", "int8_runtimes", "names",
           "register", "runtimes", "switchable_prune_section", "target_formats", "unregister"]

register(GgufBackend())
register(OnnxBackend())
register(TvmBackend())
register(ReferenceBackend())
