"""Registers prune_bias_fixture.py (a tiny model pruned with bias compensation, shared by the
formats' tests) as ``edgeq_tests_prune_bias``: with ``--import-mode=importlib`` the tests are not
a package, so it is loaded by path once here."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "edgeq_tests_prune_bias"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("prune_bias_fixture.py"))
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)
