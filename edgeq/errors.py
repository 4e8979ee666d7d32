"""The one exception type the CLI turns into a one-line error and a non-zero exit."""
import importlib


class EdgeqError(Exception):
    """A user-facing error: bad input, unsupported option, failed check."""


class MissingExtraError(EdgeqError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str):
        super().__init__(f"{module} is not installed; install it with: pip install 'edgeq[{extra}]'")


def require(module: str, extra: str):
    """Import an optional heavy dependency or fail naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on environment
        raise MissingExtraError(module, extra) from exc
