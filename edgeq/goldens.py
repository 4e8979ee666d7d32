"""Goldens: top-k token ids and log-probs for fixed prompts, recorded at build time."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GOLDEN_PROMPTS = (
    "The capital of France is Paris, a city known for its museums, its cafes and the river that "
    "runs through it. Every year millions of visitors arrive to see the tower, walk the old streets "
    "and taste the bread.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
    "    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b = b, a + b\n    return b\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who went out "
    "every morning before sunrise. One day his net came back with something strange inside it.",
)
GOLDEN_POSITIONS = 32
GOLDEN_TOPK = 8
DECIMALS = 5


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def golden_token_ids(session, prompts=GOLDEN_PROMPTS, positions: int = GOLDEN_POSITIONS) -> list[list[int]]:
    return [session.tokenize(p)[:positions] for p in prompts]


def record(session, token_ids: list[list[int]], k: int = GOLDEN_TOPK) -> dict:
    return record_logprobs(logprobs(session, token_ids), k)


def record_logprobs(lps: list[np.ndarray], k: int = GOLDEN_TOPK) -> dict:
    """Top-k ids and rounded log-probs of every position (the goldens file's per-source entry)."""
    ids_out, lp_out = [], []
    for lp in lps:
        top = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
        ids_out.append(top.tolist())
        lp_out.append(np.round(np.take_along_axis(lp, top, axis=-1), DECIMALS).tolist())
    return {"topk_ids": ids_out, "topk_logprobs": lp_out}


@dataclass
class Comparison:
    positions: int
    top1_agreement: float
    mean_kl: float  # top-k truncated KL(expected || actual), nats per position
    p99_kl: float
    max_logprob_diff: float  # on the expected top-k ids

    def to_json(self) -> dict:
        d = {k: round(float(v), 6) for k, v in self.__dict__.items()}
        d["positions"] = self.positions
        return d


def logprobs(session, token_ids: list[list[int]]) -> list[np.ndarray]:
    return [log_softmax(session.logits(ids)) for ids in token_ids]


def compare(expected: dict, actual: list[np.ndarray]) -> Comparison:
    """Compare log-probs (from :func:`logprobs`) with recorded top-k goldens."""
    agree, kls, diffs = [], [], []
    for lp, e_ids, e_lp in zip(actual, expected["topk_ids"], expected["topk_logprobs"]):
        e_ids, e_lp = np.asarray(e_ids), np.asarray(e_lp, dtype=np.float64)
        got = np.take_along_axis(lp, e_ids, axis=-1)
        agree.extend((np.argmax(lp, axis=-1) == e_ids[:, 0]).tolist())
        kls.extend((np.exp(e_lp) * (e_lp - got)).sum(axis=-1).tolist())
        diffs.append(np.abs(got - e_lp).max())
    kls_a = np.asarray(kls)
    return Comparison(positions=len(agree), top1_agreement=float(np.mean(agree)),
                      mean_kl=float(kls_a.mean()), p99_kl=float(np.percentile(kls_a, 99)),
                      max_logprob_diff=float(max(diffs)))
