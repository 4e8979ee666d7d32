"""SentencePiece-style BPE over a packed tokenizer file (:mod:`edgeq.tokenizer_pack`), in Python
and numpy: the same ids and text as the ``tokenizers`` library on the ``tokenizer.json`` it was
packed from (tests/runtimes/test_spm_bpe.py checks it against that library), with the vocabulary
kept as memory-mapped arrays instead of ~320 MB of Rust and Python objects.

The steps, as ``tokenizers`` runs them for a byte-fallback BPE without a pre-tokenizer:
1. split out the added tokens (leftmost-longest; first those matched on the raw text, then,
   after normalising each remaining piece, those matched on the normalised text);
2. normalise each remaining piece (Replace / Prepend steps), and run BPE on it as one word:
   its characters (or their ``<0xXX>`` byte tokens, or the unknown token) merged pairwise,
   lowest merge rank first, leftmost first among equals;
3. put the post-processor's prefix ids (e.g. BOS) before the sequence.
Decoding maps ids to token text (special added tokens skipped on request) and runs the
decoder steps (Replace, ByteFallback, Fuse, Strip)."""
from __future__ import annotations

import heapq
import re
from typing import Sequence

import numpy as np

from edgeq.tokenizer_pack import Packed, normalize


class _Matcher:
    """Leftmost-longest matching of a set of literal strings."""

    def __init__(self, patterns: dict[str, int]):
        self.by_first: dict[str, list[tuple[str, int]]] = {}
        for p, i in patterns.items():
            self.by_first.setdefault(p[0], []).append((p, i))
        for lst in self.by_first.values():
            lst.sort(key=lambda x: -len(x[0]))
        self.starts = re.compile("[" + "".join(re.escape(c) for c in sorted(self.by_first)) + "]") \
            if self.by_first else None

    def split(self, text: str) -> list[tuple[str, int | None]]:
        """``text`` as pieces: (substring, None) and (pattern, its id)."""
        if self.starts is None or not text:
            return [(text, None)] if text else []
        out: list[tuple[str, int | None]] = []
        pos = 0
        for m in self.starts.finditer(text):
            i = m.start()
            if i < pos:
                continue
            for p, tid in self.by_first[text[i]]:
                if text.startswith(p, i):
                    if i > pos:
                        out.append((text[pos:i], None))
                    out.append((p, tid))
                    pos = i + len(p)
                    break
        if pos < len(text):
            out.append((text[pos:], None))
        return out


class SpmBpe:
    def __init__(self, packed: Packed):
        self.meta = meta = packed.meta
        a = packed.arrays
        self._packed = packed
        self._n = int(meta["n_vocab"])
        self._keys, self._ranks, self._new = a["merges.key"], a["merges.rank"], a["merges.new_id"]
        self._chars = dict(zip(a["chars.codepoint"].tolist(), a["chars.id"].tolist()))
        self._bytes = a["bytes.id"].tolist()
        self._unk = meta.get("unk_id")
        self._fuse_unk = bool(meta.get("fuse_unk"))
        self._norm = meta["normalizer"]
        added = a["added.id"].tolist()
        flags = a["added.flags"].tolist()
        self._special = {i for i, f in zip(added, flags) if f & 1}
        raw = {packed.token_text(i): i for i, f in zip(added, flags) if not f & 2}
        norm = {packed.token_text(i): i for i, f in zip(added, flags) if f & 2}  # stored normalised
        raw.pop("", None)
        norm.pop("", None)
        self._raw, self._normed = _Matcher(raw), _Matcher(norm)
        self._cache: dict[str, list[int]] = {}
        self._pairs: dict[int, tuple[int, int] | None] = {}

    # ---- encode ---------------------------------------------------------------------------------
    def _merge(self, left: int, right: int) -> tuple[int, int] | None:
        key = left * self._n + right
        try:
            return self._pairs[key]  # text repeats its pairs: a bounded memo of the table's answers
        except KeyError:
            pass
        j = int(np.searchsorted(self._keys, key))
        hit = (int(self._ranks[j]), int(self._new[j])) if j < self._keys.size and self._keys[j] == key else None
        if len(self._pairs) >= 200_000:
            self._pairs.clear()
        self._pairs[key] = hit
        return hit

    def _symbols(self, word: str) -> list[int]:
        syms: list[int] = []
        unk_last = False
        for ch in word:
            i = self._chars.get(ord(ch))
            if i is not None:
                syms.append(i)
                unk_last = False
                continue
            bs = [self._bytes[b] for b in ch.encode("utf-8")]
            if all(b >= 0 for b in bs):
                syms.extend(bs)
                unk_last = False
            elif self._unk is not None:
                if not (self._fuse_unk and unk_last):
                    syms.append(self._unk)
                unk_last = True
        return syms

    def _bpe(self, word: str) -> list[int]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        syms = self._symbols(word)
        n = len(syms)
        if n > 1:
            nxt = list(range(1, n + 1))
            prv = list(range(-1, n - 1))
            alive = [True] * n
            # every adjacent pair's merge at once, then a heap of (rank, position, new id)
            keys = np.asarray(syms[:-1], np.int64) * self._n + np.asarray(syms[1:], np.int64)
            j = np.searchsorted(self._keys, keys)
            jc = np.minimum(j, max(self._keys.size - 1, 0))
            found = (j < self._keys.size) & (self._keys[jc] == keys) if self._keys.size else np.zeros(n - 1, bool)
            pos = np.flatnonzero(found).tolist()
            heap = [(r, p, t, syms[p], syms[p + 1]) for p, r, t in zip(pos, self._ranks[jc[found]].tolist(),
                                                                        self._new[jc[found]].tolist())]
            heapq.heapify(heap)
            while heap:
                rank, p, new, left, right = heapq.heappop(heap)
                q = nxt[p]
                if not alive[p] or q >= n:
                    continue
                if syms[p] != left or syms[q] != right:  # a neighbour merged since: the library's check
                    m = self._merge(syms[p], syms[q])
                    if m is None or m[1] != new:
                        continue  # a stale entry
                syms[p] = new
                alive[q] = False
                nxt[p] = nxt[q]
                if nxt[q] < n:
                    prv[nxt[q]] = p
                if prv[p] >= 0:
                    m = self._merge(syms[prv[p]], new)
                    if m is not None:
                        heapq.heappush(heap, (m[0], prv[p], m[1], syms[prv[p]], new))
                if nxt[p] < n:
                    m = self._merge(new, syms[nxt[p]])
                    if m is not None:
                        heapq.heappush(heap, (m[0], p, m[1], new, syms[nxt[p]]))
            syms = [s for s, ok in zip(syms, alive) if ok]
        if len(word) <= 64:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[word] = syms
        return syms

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids: list[int] = list(self.meta["prefix_ids"]) if add_special else []
        for piece, tid in self._raw.split(text):
            if tid is not None:
                ids.append(tid)
                continue
            for part, tid2 in self._normed.split(normalize(self._norm, piece)):
                if tid2 is not None:
                    ids.append(tid2)
                    continue
                ids.extend(self._bpe(part))
        return ids

    # ---- decode ---------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        toks = [self._packed.token_text(int(i)) for i in ids
                if 0 <= int(i) < self._n and not (skip_special and int(i) in self._special)]
        for step in self.meta["decoder"]:
            kind = step[0]
            if kind == "replace":
                toks = [t.replace(step[1], step[2]) for t in toks]
            elif kind == "bytefallback":
                toks = _byte_fallback(toks)
            elif kind == "fuse":
                toks = ["".join(toks)]
            elif kind == "strip":
                toks = [_strip(t, step[1], int(step[2]), int(step[3])) for t in toks]
        return "".join(toks)


_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_fallback(toks: list[str]) -> list[str]:
    """``<0xXX>`` runs back to their UTF-8 text; a run that is not valid UTF-8 becomes one U+FFFD
    per byte (as the ``tokenizers`` ByteFallback decoder)."""
    out: list[str] = []
    run = bytearray()

    def flush():
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" for _ in run)
            run.clear()

    for t in toks:
        m = _BYTE.match(t) if len(t) == 6 else None
        if m:
            run.append(int(m.group(1), 16))
        else:
            flush()
            out.append(t)
    flush()
    return out


def _strip(tok: str, content: str, start: int, stop: int) -> str:
    """The ``tokenizers`` Strip decoder: up to ``start`` leading and ``stop`` trailing ``content``."""
    i = 0
    while i < start and i < len(tok) and tok[i] == content:
        i += 1
    j = len(tok)
    while len(tok) - j < stop and j > i and tok[j - 1] == content:
        j -= 1
    return tok[i:j]
