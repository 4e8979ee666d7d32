"""Helpers of the golden-options tests (tests/backends/*/test_golden_options.py): anonymous memory a
session costs, measured in a fresh process, and a build + verify that records which session
option each runtime session was opened with. (Importable as ``golden_options``: tests/conftest.py
puts this directory on sys.path.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The start of a probe script: ``anon_kb()``, this process's anonymous resident memory in KiB.
ANON_KB = r"""
import sys

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
"""


def anon_growth(probe: str, *args, timeout: int) -> int:
    """Run ``probe`` (a script that prints the anonymous KiB it grew by last) in a fresh Python
    with ``args`` as its arguments and the repository importable; the growth in bytes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", probe, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1]) * 1024


def build_and_verify(tmp_path, monkeypatch, threshold, *, backend, limit: str, session_class, option: str,
                     build_args: list[str]):
    """With ``backend.<limit>`` set to ``threshold``, build a tiny Llama (``edgeq build model
    *build_args``) and verify it, spying on ``session_class``: (the manifest's goldens, the value of
    the session keyword ``option`` (default True) each session was opened with)."""
    from click.testing import CliRunner

    from edgeq.cli import main
    from models.tiny import make_tiny_llama

    monkeypatch.setattr(backend, limit, threshold)
    seen = []
    init = session_class.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get(option, True))
        init(self, *a, **kw)

    monkeypatch.setattr(session_class, "__init__", spy)
    model = make_tiny_llama(tmp_path / "m", seed=0)
    art = tmp_path / "a"
    for args in (["build", model, *build_args, "-o", art], ["verify", art]):
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    return json.loads((art / "manifest.json").read_text())["goldens"], seen
