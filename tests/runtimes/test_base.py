"""The shared generation loop: greedy and sampled decoding (temperature, top-k, top-p, seed)."""
import numpy as np
import pytest

from edgeq.errors import EdgeqError
from runtimes.base import Sampling, Session

LOGITS = np.log(np.array([0.05, 0.5, 0.2, 0.15, 0.1], np.float32))


class Fixed(Session):
    """Every position has the same next-token distribution; no EOS."""

    def _start(self, prompt_ids):
        return LOGITS

    def _step(self, token_id):
        return LOGITS


def _draw(sampling, n=400):
    return list(Fixed().generate_ids([0], n, stop_at_eos=False, sampling=sampling))


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    assert set(_draw(Sampling(), 20)) == {1}
    assert set(_draw(Sampling(temperature=1.0, top_k=1, seed=0), 50)) == {1}


def test_sampling_follows_the_distribution_and_the_seed():
    a, b = _draw(Sampling(temperature=1.0, seed=7)), _draw(Sampling(temperature=1.0, seed=7))
    assert a == b  # same seed, same tokens
    assert a != _draw(Sampling(temperature=1.0, seed=8))
    freq = np.bincount(a, minlength=5) / len(a)
    assert np.abs(freq - np.exp(LOGITS)).max() < 0.08
    assert set(_draw(Sampling(temperature=1.0, top_k=2, seed=1))) == {1, 2}
    assert set(_draw(Sampling(temperature=1.0, top_p=0.6, seed=1))) == {1, 2}  # 0.5 < 0.6 <= 0.7
    # a low temperature sharpens towards the argmax
    assert np.mean(np.array(_draw(Sampling(temperature=0.2, seed=3))) == 1) > 0.95


def test_bad_sampling_options():
    for kw in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(EdgeqError, match="sampling"):
            Sampling(**kw)
