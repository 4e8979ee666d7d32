"""Shared fixtures for the pass tests: calibrated tiny models and the logits comparison."""
import numpy as np
import pytest

from edgeq.calibrate import alpaca_token_sequences, calibrate
from edgeq.frontend import load_model
from runtimes.reference import ReferenceSession


def calib(ir, n=4, t=32):
    return calibrate(ir, alpaca_token_sequences(ir.tokenizer, n_samples=n, seq_len=t), progress=False)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    """(ModelIR, CalibStats) of tiny Llama and tiny Qwen2."""
    ir = load_model(request.getfixturevalue(f"tiny_{request.param}"))
    return ir, calib(ir)


def logits_rel_err(a, b, n=40):
    """max |logits(a) - logits(b)| / max |logits(a)| on fixed random tokens."""
    ids = np.random.RandomState(0).randint(0, a.hparams.vocab_size, n).tolist()
    la, lb = ReferenceSession(a).logits(ids), ReferenceSession(b).logits(ids)
    return float(np.abs(la - lb).max() / np.abs(la).max())


@pytest.fixture
def rel_err():
    return logits_rel_err


@pytest.fixture
def calibrate_tiny():
    return calib
