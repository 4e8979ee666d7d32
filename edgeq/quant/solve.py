"""The planner's choice: one option per tensor, least summed KL under a byte budget and,
optionally, a decode-time ceiling (issue 16, item 4: ``--min-speed``).

Options are any objects with ``nbytes``, ``kl`` and ``seconds`` (:class:`edgeq.plan.Option`).

* Bytes only: a Lagrangian relaxation (each tensor picks ``argmin kl + lambda * bytes``;
  ``lambda`` bisected to the budget), then a greedy pass that spends what is left on the best
  KL-per-byte upgrades.
* Bytes and time: the same with a second multiplier ``mu`` on seconds, bisected (outer loop) to
  the smallest ``mu`` whose byte-feasible pick also meets the time ceiling; the greedy pass then
  takes only upgrades that keep both. Without a ceiling the result is exactly the bytes-only one.

* Giant tensors: the relaxation assumes many small items. A tensor whose options differ by more
  than :data:`BIG_SHARE` of the budget (the vocabulary table of a small model: Gemma 3 270M's
  embedding is 70 % of the file) is an all-or-nothing step no multiplier prices right: with many
  small upgrades of a better KL-per-byte ratio the bisection settles just above the giant's own
  ratio, the small ones take the bytes, and the greedy pass cannot afford the giant's step (seen:
  the embedding left at Q5_0, predicted KL 0.13, with 65 linears at F16; the same budget with the
  embedding at Q8_0 predicted ~0.01). So each option of the (at most :data:`BIG_MAX`) giant
  tensors is tried, the others solved as above in the bytes left, and the least summed KL wins.

Deterministic (fixed tensor order, ties broken by bytes then candidate order).
"""
from __future__ import annotations

import itertools
import re
from typing import Mapping, Sequence

import numpy as np

from edgeq.errors import EdgeqError

LAMBDA_STEPS = 100
MU_STEPS = 40
BIG_SHARE = 0.1  # a tensor whose options' sizes span more than this share of the budget is enumerated
BIG_MAX = 2  # at most this many such tensors (the embedding and the output head)


def tensor_sort_key(name: str):
    m = re.match(r"blk\.(\d+)\.(.*)", name)
    return (1, int(m.group(1)), m.group(2)) if m else (0 if name == "token_embd" else 2, 0, name)


def _secs(o) -> float:
    return float(getattr(o, "seconds", 0.0))


def solve(table: Mapping[str, Sequence], budget: int, max_seconds: float | None = None) -> dict:
    """Minimise sum(kl) s.t. sum(nbytes) <= budget (and sum(seconds) <= max_seconds when given)."""
    names = sorted(table, key=tensor_sort_key)
    big = [n for n in names
           if max(o.nbytes for o in table[n]) - min(o.nbytes for o in table[n]) > BIG_SHARE * budget][:BIG_MAX]
    if not big:
        return _solve(table, budget, max_seconds)
    best, best_kl = None, None
    rest = {n: table[n] for n in names if n not in big}
    for combo in itertools.product(*(table[n] for n in big)):
        left = budget - sum(o.nbytes for o in combo)
        left_s = None if max_seconds is None else max_seconds - sum(_secs(o) for o in combo)
        try:
            sel = _solve(rest, left, left_s) if rest else {}
        except EdgeqError:  # this giant option leaves too few bytes (or too little time) for the rest
            continue
        if left < 0 or (left_s is not None and sum(_secs(o) for o in sel.values()) > left_s):
            continue
        sel.update(zip(big, combo))
        kl = sum(o.kl for o in sel.values())
        if best is None or kl < best_kl:
            best, best_kl = sel, kl
    if best is None:
        return _solve(table, budget, max_seconds)  # (raises the reason no plan fits)
    return {n: best[n] for n in names}


def _solve(table: Mapping[str, Sequence], budget: int, max_seconds: float | None = None) -> dict:
    """The relaxation and the greedy pass (see the module doc)."""
    names = sorted(table, key=tensor_sort_key)
    cheapest = sum(min(o.nbytes for o in table[n]) for n in names)
    if cheapest > budget:
        raise EdgeqError(f"budget of {budget / 1e6:.2f} MB is below the smallest possible size "
                         f"{cheapest / 1e6:.2f} MB for these candidate types")

    # one row per tensor, one column per candidate (padded with an infinite KL): picks are vectorised
    width = max(len(table[n]) for n in names)
    kl = np.full((len(names), width), np.inf)
    nb, sc = np.zeros_like(kl), np.zeros_like(kl)
    for i, n in enumerate(names):
        for j, o in enumerate(table[n]):
            kl[i, j], nb[i, j], sc[i, j] = o.kl, o.nbytes, _secs(o)
    rows = np.arange(len(names))

    def pick(lam: float, mu: float) -> dict:
        val = kl + lam * nb + mu * sc if mu else kl + lam * nb
        tie = np.where(val == val.min(axis=1, keepdims=True), nb, np.inf)  # equal value: fewer bytes, then order
        idx = np.argmin(tie, axis=1)
        return {n: table[n][j] for n, j in zip(names, idx[rows].tolist())}

    def total(sel) -> int:
        return sum(o.nbytes for o in sel.values())

    def seconds(sel) -> float:
        return sum(_secs(o) for o in sel.values())

    def fit_bytes(mu: float) -> dict:
        lo, hi = 0.0, 1.0
        if total(pick(lo, mu)) <= budget:
            return pick(lo, mu)
        while total(pick(hi, mu)) > budget:
            hi *= 4.0
            if hi > 1e30:
                break
        for _ in range(LAMBDA_STEPS):
            mid = (lo + hi) / 2
            if total(pick(mid, mu)) > budget:
                lo = mid
            else:
                hi = mid
        return pick(hi, mu)

    sel = fit_bytes(0.0)
    if max_seconds is not None and seconds(sel) > max_seconds:
        fastest = sum(min(_secs(o) for o in table[n]) for n in names)
        if fastest > max_seconds:
            raise EdgeqError(f"no plan is fast enough: the fastest candidates take {fastest * 1e3:.3f} ms per token, "
                             f"the speed floor allows {max_seconds * 1e3:.3f} ms")
        lo, hi = 0.0, 1.0
        while seconds(fit_bytes(hi)) > max_seconds:
            hi *= 4.0
            if hi > 1e30:
                raise EdgeqError("no plan meets both the size budget and the speed floor; lower --min-speed "
                                 "or raise the budget")
        for _ in range(MU_STEPS):
            mid = (lo + hi) / 2
            if seconds(fit_bytes(mid)) > max_seconds:
                lo = mid
            else:
                hi = mid
        sel = fit_bytes(hi)
    # greedy: spend what is left on the best KL-per-byte upgrades (within the time ceiling)
    used, used_s = total(sel), seconds(sel)
    while True:
        best = None
        for n in names:
            cur = sel[n]
            for o in table[n]:
                extra = o.nbytes - cur.nbytes
                gain = cur.kl - o.kl
                if gain <= 0 or extra <= 0 or used + extra > budget:
                    continue
                if max_seconds is not None and used_s + _secs(o) - _secs(cur) > max_seconds:
                    continue
                key = gain / extra
                if best is None or key > best[0]:
                    best = (key, n, o)
        if best is None:
            break
        _, n, o = best
        used += o.nbytes - sel[n].nbytes
        used_s += _secs(o) - _secs(sel[n])
        sel[n] = o
    return sel
