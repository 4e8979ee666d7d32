"""Registers prune_bias_fixture.py (a tiny model pruned with bias compensation, shared by the
formats' tests) as ``edgeq_tests_prune_bias``: with ``--import-mode=importlib`` the tests are not
a package, so it is loaded by path once here; and the pruned tiny Gemma 3 the ONNX and TVM tests share."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_NAME = "edgeq_tests_prune_bias"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("prune_bias_fixture.py"))
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)


@pytest.fixture(scope="session")
def pruned_gemma3_ir(tiny_gemma3):
    """The tiny Gemma 3 through the build's pruning steps: UniQL sort, MLP channels only (Q/K pairs
    are exempt under QK-norm), rates 0 and 0.25, with bias compensation (4 x 64 Alpaca tokens)."""
    return sys.modules[_NAME].biased_ir(tiny_gemma3, dims="mlp", rates=(0.0, 0.25))
