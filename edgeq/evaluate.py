"""Accuracy evaluations over any runtime Session (../shared/design/BENCHMARK_PROTOCOL.md).

Everything goes through the Session API (``tokenize`` / ``logits``), so the same code scores
the numpy reference runtime (at any pruning rate), llama.cpp artifacts and later runtimes.

* WikiText-2 perplexity: whole text tokenized once without BOS; non-overlapping windows of
  ``ctx`` tokens; only the second half of each window is scored (llama.cpp's llama-perplexity).
* KL divergence vs a reference session: the same windows and scored positions; per position
  KL(ref ‖ session) over the full vocabulary in nats (float64 log-softmax); mean, 99th
  percentile (numpy's linear interpolation) and top-1 agreement (argmax equal).
  :func:`evaluate_wikitext` computes perplexity and KL in one pass over the windows.
* LAMBADA (OpenAI version): the target is the last whitespace-separated word with its leading
  space, the context the text before it. An item is correct when greedy decoding reproduces
  every target token; that is checked teacher-forced — one ``logits`` call on context+target,
  each target token must be the argmax given the tokens before it — which is equivalent to
  greedy decoding (greedy stops being right exactly at the first position whose argmax is not
  the target token). See :func:`lambada_item_ids` for the tokenization rule.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgeq.errors import EdgeqError
from edgeq.goldens import log_softmax

_DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def resolve_data_dir() -> Path:
    """``$EDGEQ_DATA`` (read at call time), else ``../shared/data`` next to the project."""
    env = os.environ.get("EDGEQ_DATA")
    return Path(env) if env else _DEFAULT_DATA_DIR


DATA_DIR = resolve_data_dir()  # as resolved at import; functions re-resolve when not given one


def _missing(path: Path) -> EdgeqError:
    return EdgeqError(f"{path} not found (set EDGEQ_DATA to the shared data directory)")


def wikitext2_test_text(data_dir: Path | None = None) -> str:
    path = Path(data_dir or resolve_data_dir()) / "wikitext-2-raw" / "wiki.test.raw"
    if not path.exists():
        raise _missing(path)
    lines = path.read_bytes().decode("utf-8").split("\r\n")[:-1]
    rows = [l + "\n" if l.strip() else "" for l in lines]
    return "\n\n".join(rows)


def _bar(it, progress: bool, desc: str, unit: str):
    if not progress:
        return it
    return tqdm(it, desc=desc, unit=unit, leave=False)


# ---- perplexity and KL ------------------------------------------------------------------------
@dataclass
class Perplexity:
    ppl: float
    nll: float
    scored_tokens: int
    windows: int
    ctx: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class KLResult:
    """KL(ref ‖ session) per scored position, in nats."""

    mean_kl: float
    p99_kl: float
    max_kl: float
    top1_agreement: float
    count: int  # scored positions
    windows: int
    ctx: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class WikitextResult:
    perplexity: Perplexity
    kl: KLResult | None = None  # when a reference session was given
    reference_perplexity: Perplexity | None = None  # the reference's own ppl (free in that pass)

    def to_json(self) -> dict:
        return {"perplexity": self.perplexity.to_json(),
                "kl": self.kl.to_json() if self.kl else None,
                "reference_perplexity": self.reference_perplexity.to_json() if self.reference_perplexity else None}


_ROW_CHUNK = 64  # rows of log-softmax at a time (float64 x vocab): bounds memory on big vocabs


def _window_logits(session, win: list[int], first: int, ctx: int) -> np.ndarray:
    """Logits of the positions that predict ``win[first:]`` — rows first-1 .. ctx-2."""
    lg = np.asarray(session.logits(win))
    if lg.ndim != 2 or lg.shape[0] != len(win):
        raise EdgeqError(f"{getattr(session, 'name', 'session')}: logits of shape {lg.shape} for "
                         f"{len(win)} tokens (expected ({len(win)}, vocab))")
    return lg[first - 1:ctx - 1]


def _score_windows(session, ref_session, tokens, ctx: int, max_tokens: int | None, progress: bool):
    if ctx < 2:
        raise EdgeqError(f"ctx must be >= 2, got {ctx}")
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    n_windows = len(tokens) // ctx
    if n_windows == 0:
        raise EdgeqError(f"need at least {ctx} tokens, got {len(tokens)}")
    first = ctx // 2
    rows = np.arange(ctx - first)
    total, ref_total, count = 0.0, 0.0, 0
    kls: list[np.ndarray] = []
    agree = 0
    desc = "perplexity" if ref_session is None else "perplexity+KL"
    for w in _bar(range(n_windows), progress, desc, "window"):
        win = [int(t) for t in tokens[w * ctx:(w + 1) * ctx]]
        tgt = np.asarray(win[first:], dtype=np.int64)
        lg = _window_logits(session, win, first, ctx)
        if ref_session is None:
            # position t predicts token t+1; score targets first..ctx-1
            total -= float(log_softmax(lg)[rows, tgt].sum())
            count += tgt.size
            continue
        rlg = _window_logits(ref_session, win, first, ctx)
        if rlg.shape != lg.shape:
            raise EdgeqError(f"reference logits {rlg.shape} and session logits {lg.shape} differ in "
                             "vocabulary size; KL needs the same vocabulary")
        nll, rnll = 0.0, 0.0
        for s in range(0, lg.shape[0], _ROW_CHUNK):
            lp, rlp = log_softmax(lg[s:s + _ROW_CHUNK]), log_softmax(rlg[s:s + _ROW_CHUNK])
            r, t = rows[:lp.shape[0]], tgt[s:s + _ROW_CHUNK]
            nll -= float(lp[r, t].sum())
            rnll -= float(rlp[r, t].sum())
            kls.append((np.exp(rlp) * (rlp - lp)).sum(axis=-1))
            agree += int((np.argmax(lp, axis=-1) == np.argmax(rlp, axis=-1)).sum())
        total += nll
        ref_total += rnll
        count += tgt.size
    nll = total / count
    ppl = Perplexity(ppl=math.exp(nll), nll=nll, scored_tokens=count, windows=n_windows, ctx=ctx)
    if ref_session is None:
        return ppl, None, None
    k = np.concatenate(kls)
    kl = KLResult(mean_kl=float(k.mean()), p99_kl=float(np.percentile(k, 99)), max_kl=float(k.max()),
                  top1_agreement=agree / count, count=count, windows=n_windows, ctx=ctx)
    rnll = ref_total / count
    ref_ppl = Perplexity(ppl=math.exp(rnll), nll=rnll, scored_tokens=count, windows=n_windows, ctx=ctx)
    return ppl, kl, ref_ppl


def perplexity(session, tokens: list[int], ctx: int = 512, max_tokens: int | None = 16384,
               progress: bool = True) -> Perplexity:
    return _score_windows(session, None, tokens, ctx, max_tokens, progress)[0]


def kl_vs_reference(session, ref_session, tokens: list[int], ctx: int = 512, max_tokens: int | None = 16384,
                    progress: bool = True) -> KLResult:
    """KL(ref ‖ session) on the perplexity windows; use :func:`evaluate_wikitext` to get the
    perplexity from the same pass."""
    return _score_windows(session, ref_session, tokens, ctx, max_tokens, progress)[1]


def wikitext2_tokens(session, data_dir: Path | None = None) -> list[int]:
    """The whole WikiText-2 test text tokenized once with the session's tokenizer, no BOS."""
    return list(session.tokenize(wikitext2_test_text(data_dir), add_special=False))


def check_same_tokenizer(session, ref_session, text: str) -> None:
    """KL compares the two models position by position: they must tokenize ``text`` alike
    (checked on its first 4000 characters)."""
    head = text[:4000]
    if list(ref_session.tokenize(head, add_special=False)) != list(session.tokenize(head, add_special=False)):
        raise EdgeqError("the reference and the evaluated model tokenize the text differently; "
                         "KL needs the same tokenizer")


def evaluate_wikitext(session, ref_session=None, tokens: list[int] | None = None, ctx: int = 512,
                      max_tokens: int | None = 16384, progress: bool = True,
                      data_dir: Path | None = None) -> WikitextResult:
    """Perplexity of ``session`` and, given ``ref_session``, KL(ref ‖ session) — one pass.

    ``tokens`` default: the WikiText-2 test text tokenized by ``session`` (no BOS); the
    reference is fed the same ids (its tokenizer is checked to agree on the text's start).
    """
    if tokens is None:
        text = wikitext2_test_text(data_dir)
        tokens = list(session.tokenize(text, add_special=False))
        if ref_session is not None:
            check_same_tokenizer(session, ref_session, text)
    ppl, kl, ref_ppl = _score_windows(session, ref_session, tokens, ctx, max_tokens, progress)
    return WikitextResult(perplexity=ppl, kl=kl, reference_perplexity=ref_ppl)


# ---- LAMBADA ----------------------------------------------------------------------------------
@dataclass
class LambadaResult:
    accuracy: float
    correct: int
    items: int
    fallback_items: int  # items whose target was tokenized on its own (see lambada_item_ids)
    limit: int | None
    path: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


def lambada_path(path: str | Path | None = None) -> Path:
    p = Path(path) if path is not None else resolve_data_dir() / "lambada" / "lambada_test.jsonl"
    if not p.exists():
        raise _missing(p)
    return p


def split_lambada(text: str) -> tuple[str, str]:
    """(context, target): the target is the last whitespace-separated word with the whitespace
    character before it (a space in LAMBADA); the context is everything before that."""
    body = text.rstrip()
    cut = max((i for i, ch in enumerate(body) if ch.isspace()), default=-1)
    if cut <= 0:
        raise EdgeqError(f"LAMBADA item without a context: {text[:60]!r}")
    return body[:cut], body[cut:]


def load_lambada(path: str | Path | None = None, limit: int | None = None) -> list[tuple[str, str]]:
    """The first ``limit`` items (all when None) as (context, target) pairs, in file order."""
    p = lambada_path(path)
    items = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EdgeqError(f"{p}:{n}: expected a JSON object with a \"text\" field") from None
            items.append(split_lambada(text))
    if not items:
        raise EdgeqError(f"{p}: no LAMBADA items")
    return items


def lambada_item_ids(session, context: str, target: str) -> tuple[list[int], int, bool]:
    """Token ids of context+target, the number of target tokens at the end, and whether the
    fallback was used.

    Both strings are tokenized without BOS (as for perplexity). Normally the target tokens are
    the suffix of ``tokenize(context + target)`` after ``tokenize(context)`` — the target as
    the model sees it in running text. Where that split does not align (the tokenizer merges
    across the boundary, so ``tokenize(context)`` is not a prefix of the joint tokenization)
    the target (" " + word) is tokenized on its own and appended to the context's tokens.
    """
    ctx_ids = list(session.tokenize(context, add_special=False))
    full = list(session.tokenize(context + target, add_special=False))
    if len(full) > len(ctx_ids) and full[:len(ctx_ids)] == ctx_ids:
        return full, len(full) - len(ctx_ids), False
    tgt_ids = list(session.tokenize(target, add_special=False))
    if not ctx_ids or not tgt_ids:
        raise EdgeqError(f"LAMBADA item tokenizes to an empty context or target: {target!r}")
    return ctx_ids + tgt_ids, len(tgt_ids), True


def lambada_item_correct(session, ids: list[int], n_target: int) -> bool:
    """Teacher-forced greedy check: every target token is the argmax given all tokens before it."""
    # only the rows that predict the target (+ the last, unused): the output head of the other
    # positions skipped. The whole sequence is still fed, as before: llama.cpp's numbers depend
    # on the batch's token count (its kernels tile rows), not on how many rows are read out.
    lg = np.asarray(session.last_logits(ids, n_target + 1))
    pred = np.argmax(lg[:-1], axis=-1)
    return bool(np.array_equal(pred, np.asarray(ids[len(ids) - n_target:])))


def lambada(session, path: str | Path | None = None, limit: int | None = None,
            progress: bool = True) -> LambadaResult:
    """LAMBADA accuracy of ``session`` on the first ``limit`` items (all 5153 when None)."""
    p = lambada_path(path)
    items = load_lambada(p, limit)
    correct = fallback = 0
    it = _bar(items, progress, "lambada", "item")
    for n, (context, target) in enumerate(it, 1):
        ids, n_target, fell_back = lambada_item_ids(session, context, target)
        fallback += fell_back
        correct += lambada_item_correct(session, ids, n_target)
        if progress and n % 25 == 0:
            it.set_postfix(acc=f"{correct / n:.3f}")
    return LambadaResult(accuracy=correct / len(items), correct=correct, items=len(items),
                         fallback_items=fallback, limit=limit, path=str(p))
