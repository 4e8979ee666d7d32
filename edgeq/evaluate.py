"""Accuracy evaluations over any runtime Session (../shared/design/BENCHMARK_PROTOCOL.md).

* WikiText-2 perplexity: whole text tokenized once without BOS; non-overlapping windows of
  ``ctx`` tokens; only the second half of each window is scored (llama.cpp's llama-perplexity).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.goldens import log_softmax

DATA_DIR = Path(os.environ.get("EDGEQ_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def wikitext2_test_text(data_dir: Path = DATA_DIR) -> str:
    path = data_dir / "wikitext-2-raw" / "wiki.test.raw"
    if not path.exists():
        raise EdgeqError(f"{path} not found (set EDGEQ_DATA to the shared data directory)")
    lines = path.read_bytes().decode("utf-8").split("\r\n")[:-1]
    rows = [l + "\n" if l.strip() else "" for l in lines]
    return "\n\n".join(rows)


@dataclass
class Perplexity:
    ppl: float
    nll: float
    scored_tokens: int
    windows: int
    ctx: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


def perplexity(session, tokens: list[int], ctx: int = 512, max_tokens: int | None = 16384,
               progress: bool = True) -> Perplexity:
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n_windows = len(tokens) // ctx
    if n_windows == 0:
        raise EdgeqError(f"need at least {ctx} tokens, got {len(tokens)}")
    first = ctx // 2
    total, count = 0.0, 0
    it = range(n_windows)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="perplexity", unit="window", leave=False)
    for w in it:
        win = tokens[w * ctx:(w + 1) * ctx]
        lp = log_softmax(session.logits(win))
        # position t predicts token t+1; score targets first..ctx-1
        tgt = np.asarray(win[first:], dtype=np.int64)
        total -= float(lp[np.arange(first - 1, ctx - 1), tgt].sum())
        count += tgt.size
    nll = total / count
    return Perplexity(ppl=math.exp(nll), nll=nll, scored_tokens=count, windows=n_windows, ctx=ctx)
