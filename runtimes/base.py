"""The Session API every runtime implements. Importable without torch.

A Session owns one loaded artifact (or ModelIR) and offers:

* ``tokenize(text, add_special=True) -> list[int]`` / ``detokenize(ids) -> str``
* ``logits(token_ids) -> np.ndarray``: float32 ``(len(token_ids), vocab)`` logits for every
  position of a fresh context (no state carried between calls).
* ``generate(prompt, max_tokens, ...) -> Iterator[str]``: streaming of text pieces, greedy by
  default or sampled (:class:`Sampling`: temperature, top-k, top-p, seed); stops at EOS or
  ``max_tokens``. ``last_stats`` holds timings of the last call.
* ``profile(...)``: see :mod:`edgeq.profile`, which drives sessions through this API.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgeq.artifact import read_manifest
from edgeq.errors import EdgeqError


@dataclass(frozen=True)
class Sampling:
    """Next-token choice: ``temperature`` 0 is greedy (argmax); otherwise softmax(logits / T)
    restricted to the ``top_k`` most likely tokens (0: all) and to the smallest set whose
    probability reaches ``top_p``, drawn with a generator seeded by ``seed`` (reproducible)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise EdgeqError(f"bad sampling options: temperature {self.temperature} (>= 0), top_k {self.top_k} "
                             f"(>= 0), top_p {self.top_p} (in (0, 1])")

    def chooser(self):
        if self.temperature == 0:
            return lambda logits: int(np.argmax(logits))
        rng = np.random.default_rng(self.seed)

        def choose(logits: np.ndarray) -> int:
            z = logits.astype(np.float64) / self.temperature
            order = np.argsort(-z, kind="stable")
            if self.top_k:
                order = order[:self.top_k]
            p = np.exp(z[order] - z[order[0]])
            p /= p.sum()
            if self.top_p < 1:
                keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
                order, p = order[:keep], p[:keep] / p[:keep].sum()
            return int(order[rng.choice(len(order), p=p)])

        return choose


GREEDY = Sampling()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0  # time to first token (prompt evaluation + first sample)
    decode_seconds: float = 0.0  # time for the remaining new tokens
    token_ids: list[int] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        n = self.new_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


def artifact_manifest(root: Path, manifest: dict | None, fmt: str) -> dict:
    """The manifest of the artifact at ``root`` (read unless given), checked to be of format ``fmt``."""
    m = manifest or read_manifest(root)
    if m.get("format") != fmt:
        article = "an" if fmt[:1] in "aeiou" else "a"
        raise EdgeqError(f"{root}: not {article} {fmt} artifact (format {m.get('format')!r})")
    return m


def check_tokens(ids: Sequence[int], vocab_size: int, start: int, n_ctx: int) -> np.ndarray:
    """``ids`` as int64, after the checks every numpy-driven runtime makes: not empty, in the
    vocabulary, and fitting the context after the ``start`` cached positions."""
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    if arr.size == 0:
        raise EdgeqError("empty token sequence")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise EdgeqError(f"token id out of range [0, {vocab_size})")
    if start + arr.size > n_ctx:
        raise EdgeqError(f"context of {start + arr.size} tokens exceeds n_ctx={n_ctx}")
    return arr


class RateSwitchMixin:
    """Run-time pruning-rate switching for sessions whose weights carry every rate (ONNX graph
    with a rate input, TVM kernels with an active width): the carried ``_rates``, lookup with a
    one-line error, and ``set_prune_rate`` with the reference runtime's KV-cache policies.
    A session sets ``_rates`` and ``_ids`` (the cached token ids), implements ``reset``,
    ``_forward_cached(ids)`` (evaluate ids into the cache) and may override ``_apply_rate``."""

    _rates: tuple[float, ...] = (0.0,)
    _ids: list[int]
    prune_rate: float = 0.0

    @property
    def prune_rates(self) -> tuple[float, ...]:
        return self._rates

    def _index_of(self, rate: float) -> int:
        for k, r in enumerate(self._rates):
            if abs(r - float(rate)) < 1e-9:
                return k
        raise EdgeqError(f"pruning rate {float(rate):g} is not carried by this artifact "
                         f"(available: {', '.join(f'{r:g}' for r in self._rates)})")

    def _apply_rate(self, index: int) -> None:
        """Make rate ``self._rates[index]`` the one the next call computes with."""

    def set_prune_rate(self, rate: float, kv: str = "keep") -> None:
        """Switch the pruning rate without loading or copying weights. KV cache as the reference
        runtime: ``kv="keep"`` keeps cached positions as computed at their own rate (dims a rate
        drops are zero in the cache), ``kv="recompute"`` re-evaluates them at the new rate."""
        if kv not in ("keep", "recompute"):
            raise EdgeqError(f"kv policy must be 'keep' or 'recompute', got {kv!r}")
        k = self._index_of(rate)
        self.prune_rate = self._rates[k]
        self._apply_rate(k)
        if kv == "recompute" and self._ids:
            ids = list(self._ids)
            self.reset()
            self._forward_cached(ids)


def check_last(n: int, length: int) -> None:
    """``last_logits``' bound: 1 <= n <= the sequence's length."""
    if not 1 <= n <= length:
        raise ValueError(f"last_logits: n={n} outside 1..{length}")


class Session:
    """Base class: subclasses implement tokenize/detokenize, logits, reset, eval_next."""

    name: str = "base"
    eos_ids: frozenset[int] = frozenset()
    last_stats: GenerationStats | None = None

    # --- to implement ---------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def last_logits(self, token_ids: Sequence[int], n: int) -> np.ndarray:
        """Logits of the last ``n`` positions only, (n, vocab): what a teacher-forced check of a
        short continuation needs (LAMBADA). The same rows as ``logits(token_ids)[-n:]``; runtimes
        that can skip the output head for the other positions override it (llama.cpp, reference):
        with a 262k-token vocabulary the head is most of the work of a short sequence."""
        check_last(n, len(token_ids))
        return np.asarray(self.logits(token_ids))[-n:]

    def _start(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Reset state, evaluate the prompt, return the last position's logits (vocab,)."""
        raise NotImplementedError

    def _step(self, token_id: int) -> np.ndarray:
        """Append one token to the context, return its logits (vocab,)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --- shared ---------------------------------------------------------------------------
    def apply_chat_template(self, prompt: str) -> str:
        return prompt

    @property
    def has_chat_template(self) -> bool:
        """Whether the artifact carries a chat template (``apply_chat_template`` wraps the prompt)."""
        return False

    def generate_ids(self, prompt_ids: Sequence[int], max_tokens: int,
                     stop_at_eos: bool = True, sampling: Sampling = GREEDY) -> Iterator[int]:
        """Decoding (greedy unless ``sampling`` says otherwise); yields token ids as they are
        produced; fills ``last_stats``."""
        choose = sampling.chooser()
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.last_stats = stats
        t0 = time.perf_counter()
        logits = self._start(prompt_ids)
        tok = choose(logits)
        stats.prefill_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(max_tokens):
            if stop_at_eos and tok in self.eos_ids:
                break
            stats.token_ids.append(tok)
            stats.new_tokens += 1
            stats.decode_seconds = time.perf_counter() - t1
            yield tok
            if i + 1 == max_tokens:
                break
            logits = self._step(tok)
            tok = choose(logits)
        stats.decode_seconds = time.perf_counter() - t1

    def generate(self, prompt: str, max_tokens: int = 64, chat: bool = False,
                 stop_at_eos: bool = True, sampling: Sampling = GREEDY) -> Iterator[str]:
        """Stream decoded text pieces (greedy unless ``sampling`` says otherwise)."""
        text = self.apply_chat_template(prompt) if chat else prompt
        ids = self.tokenize(text)
        out: list[int] = []
        emitted = ""
        for tok in self.generate_ids(ids, max_tokens, stop_at_eos=stop_at_eos, sampling=sampling):
            out.append(tok)
            full = self.detokenize(out)
            # hold back incomplete UTF-8 sequences
            if full.endswith("\ufffd"):
                continue
            piece, emitted = full[len(emitted):], full
            if piece:
                yield piece
        full = self.detokenize(out)
        if len(full) > len(emitted):
            yield full[len(emitted):]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
