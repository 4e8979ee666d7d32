"""Goldens: top-k token ids and log-probs for fixed prompts, recorded at build time."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError

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
    # What the expected distributions say at all: top-k truncated KL(expected || uniform over the
    # vocabulary), nats per position. A near-flat model (a small random one) has a tiny one.
    mean_info: float = 0.0
    # mean_kl / mean_info: the share of that information the actual distributions lose; scale-free
    # (~0 for a faithful artifact, ~1 or more for one unrelated to the expected model).
    relative_kl: float = 0.0
    # top-1 agreement counted only where the expected top-1 beats its top-2 by >= clear_margin
    # nats (elsewhere the top-1 is a near tie that any rounding may flip).
    clear_margin: float = 0.0
    clear_positions: int = 0
    clear_top1_agreement: float | None = None

    def to_json(self) -> dict:
        d = {k: (v if v is None or isinstance(v, int) else round(float(v), 6)) for k, v in self.__dict__.items()}
        d["positions"], d["clear_positions"] = self.positions, self.clear_positions
        return d


def load_goldens(path: str | Path) -> dict:
    """A goldens file, parsed and checked: ``token_ids`` a non-empty list of non-empty lists of
    token ids; ``rates`` maps a rate to ``artifact`` / ``reference`` entries whose ``topk_ids``
    (ints >= 0) and ``topk_logprobs`` (finite floats) have one row of k >= 1 per position of
    every prompt. Anything else is one EdgeqError line."""
    path = Path(path)

    def bad(what: str):
        raise EdgeqError(f"{path}: corrupt goldens ({what})")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        bad(exc.__class__.__name__)
    if not isinstance(data, dict):
        bad("not a JSON object")
    tids = data.get("token_ids")
    if not (isinstance(tids, list) and tids and all(isinstance(t, list) and t and all(_is_int(i) and i >= 0 for i in t)
                                                   for t in tids)):
        bad("token_ids must be a non-empty list of non-empty lists of token ids")
    rates = data.get("rates")
    if not isinstance(rates, dict) or not rates:
        bad("rates must be a non-empty JSON object")
    for key, entry in rates.items():
        try:
            ok = math.isfinite(float(key))
        except ValueError:
            ok = False
        if not ok:
            bad(f"rate {key!r} is not a number")
        if not isinstance(entry, dict):
            bad(f"rate {key}: not a JSON object")
        for source in ("artifact", "reference"):
            e = entry.get(source)
            if not isinstance(e, dict):
                bad(f"rate {key}: no {source} entry")
            for field_, good in (("topk_ids", lambda v: _is_int(v) and v >= 0),
                                 ("topk_logprobs", lambda v: _is_num(v) and math.isfinite(v))):
                rows = e.get(field_)
                if not isinstance(rows, list) or len(rows) != len(tids):
                    bad(f"rate {key}: {source}.{field_} must have one list per prompt")
                for prompt, t in zip(rows, tids):
                    if not (isinstance(prompt, list) and len(prompt) == len(t)
                            and all(isinstance(r, list) and r and len(r) == len(prompt[0]) and all(good(v) for v in r)
                                    for r in prompt)):
                        bad(f"rate {key}: {source}.{field_} must have one row of k values per position")
            if any(len(a[0]) != len(b[0]) for a, b in zip(e["topk_ids"], e["topk_logprobs"])):
                bad(f"rate {key}: {source}: topk_ids and topk_logprobs differ in k")
        floor = entry.get("reference_floor")
        if floor is not None and not (isinstance(floor, dict) and isinstance(floor.get("weight_type"), str)
                                      and all(_is_num(floor.get(f)) and math.isfinite(floor[f]) and floor[f] >= 0
                                              for f in ("relative_kl", "mean_kl"))
                                      and (floor.get("clear_top1_agreement") is None
                                           or (_is_num(floor["clear_top1_agreement"])
                                               and 0 <= floor["clear_top1_agreement"] <= 1))):
            bad(f"rate {key}: reference_floor must hold weight_type, relative_kl, mean_kl (finite, >= 0) and "
                "clear_top1_agreement (null or in [0, 1])")
    return data


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def logprobs(session, token_ids: list[list[int]]) -> list[np.ndarray]:
    return [log_softmax(session.logits(ids)) for ids in token_ids]


def compare(expected: dict, actual: list[np.ndarray], clear_margin: float = 0.0,
            where: str = "goldens") -> Comparison:
    """Compare log-probs (from :func:`logprobs`, full vocabulary) with recorded top-k goldens
    (checked by :func:`load_goldens`; ids outside the vocabulary are one EdgeqError line)."""
    agree, clear, kls, infos, diffs = [], [], [], [], []
    for lp, e_ids, e_lp in zip(actual, expected["topk_ids"], expected["topk_logprobs"]):
        e_ids, e_lp = np.asarray(e_ids, dtype=np.int64), np.asarray(e_lp, dtype=np.float64)
        if e_ids.shape != e_lp.shape or e_ids.ndim != 2 or e_ids.shape[0] != lp.shape[0]:
            raise EdgeqError(f"{where}: goldens of shape {e_ids.shape} do not match the {lp.shape[0]} positions run")
        if e_ids.min() < 0 or e_ids.max() >= lp.shape[-1]:
            raise EdgeqError(f"{where}: goldens name token ids outside the vocabulary (size {lp.shape[-1]})")
        got = np.take_along_axis(lp, e_ids, axis=-1)
        p = np.exp(e_lp)
        agree.extend((np.argmax(lp, axis=-1) == e_ids[:, 0]).tolist())
        margin = e_lp[:, 0] - e_lp[:, 1] if e_lp.shape[-1] > 1 else np.full(len(e_lp), np.inf)
        clear.extend((margin >= clear_margin).tolist())
        kls.extend((p * (e_lp - got)).sum(axis=-1).tolist())
        infos.extend((p * (e_lp + np.log(lp.shape[-1]))).sum(axis=-1).tolist())
        diffs.append(np.abs(got - e_lp).max())
    kls_a, agree_a, clear_a = np.asarray(kls), np.asarray(agree), np.asarray(clear, dtype=bool)
    mean_kl, info = float(kls_a.mean()), float(np.mean(infos))
    if info > 0:
        rel = mean_kl / info
    else:  # a uniform expected distribution: nothing to lose
        rel = 0.0 if mean_kl <= 0 else float("inf")
    return Comparison(positions=len(agree), top1_agreement=float(agree_a.mean()),
                      mean_kl=mean_kl, p99_kl=float(np.percentile(kls_a, 99)),
                      max_logprob_diff=float(max(diffs)), mean_info=info, relative_kl=rel,
                      clear_margin=float(clear_margin), clear_positions=int(clear_a.sum()),
                      clear_top1_agreement=float(agree_a[clear_a].mean()) if clear_a.any() else None)
