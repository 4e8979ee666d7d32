"""Reading the JSON files of checkpoints and adapters with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

from edgeq.errors import EdgeqError


def read_json(path: Path, missing: str | None = None) -> dict:
    """Parse ``path``; a missing file raises ``missing`` (when given), bad JSON names the line."""
    if missing is not None and not path.exists():
        raise EdgeqError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EdgeqError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise EdgeqError(f"{path}: invalid JSON ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise EdgeqError(f"{path}: cannot read ({exc.strerror or exc})") from None
