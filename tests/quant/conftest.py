"""Calibrated tiny models for the quantizer tests."""
import pytest

from edgeq.calibrate import alpaca_token_sequences, calibrate
from edgeq.frontend import load_model


@pytest.fixture(scope="module")
def tiny_calibrated(tiny_llama):
    """(ModelIR, CalibStats, sequences) of the tiny Llama: 8 Alpaca sequences of 64 tokens."""
    ir = load_model(tiny_llama)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=8, seq_len=64)
    return ir, calibrate(ir, seqs, progress=False), seqs
