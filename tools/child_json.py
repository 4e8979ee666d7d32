"""Run a benchmark snippet in a fresh Python process (its own memory, its own peak RSS) and read
back the JSON it prints last; shared by tools/bench_onnx.py and tools/bench_onnx_rates.py
(imported by name: a script's own folder is on sys.path)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping

REPO = Path(__file__).resolve().parents[1]


def run_json(code: str):
    """Run ``code`` with ``python -c`` in the repository root (progress bars off); the JSON value of
    its last stdout line. A failing process raises RuntimeError with the end of its stderr."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def speed_rounds(arts: Mapping[str, Path], rounds: int, code_for: Callable[[Path], str],
                 log: Callable[[str], None]) -> dict[str, list]:
    """Each artifact's ``run_json(code_for(path))``, ``rounds`` times, interleaved (A B A B ...):
    {name: [one result a round]}."""
    got: dict[str, list] = {n: [] for n in arts}
    for k in range(rounds):
        for name, path in arts.items():
            log(f"speed round {k + 1}/{rounds}: {name}")
            got[name].append(run_json(code_for(path)))
    return got
