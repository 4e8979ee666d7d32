"""Tokenization and chat templates from a TokenizerSpec (``tokenizers`` + jinja2; no torch), or from
a packed SentencePiece-style vocabulary (:mod:`runtimes.spm_bpe`; no ``tokenizers``)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from edgeq.chat_template import render  # sandboxed: chat templates are untrusted input
from edgeq.errors import EdgeqError
from edgeq.ir import TokenizerSpec
from edgeq.tokenizer_pack import eos_ids, read_packed



class SpecTokenizer:
    def __init__(self, spec: TokenizerSpec):
        if not spec.tokenizer_json:
            raise EdgeqError("this model carries no tokenizer.json; cannot tokenize text")
        from tokenizers import Tokenizer  # here: a session with a packed vocabulary never loads it

        self._tok = Tokenizer.from_str(spec.tokenizer_json)
        self._eos = eos_ids(spec)
        # what encode / chat need, not the vocabulary's Python objects: the tokens (but BOS / EOS,
        # which the chat template names), merges, scores and the tokenizer.json text are ~155 MB of
        # a session's memory for Gemma 3's 262,144-token vocabulary (docs/benchmarks.md, issue 17)
        keep = {i for i in (spec.bos_id, spec.eos_id) if i is not None}
        self.spec = dataclasses.replace(spec, tokenizer_json="", merges=(), token_types=(),
                                        scores=None if spec.scores is None else (),
                                        tokens=tuple(t if i in keep else "" for i, t in enumerate(spec.tokens)))

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=add_special).ids)
        return _with_bos(ids, add_special, self.spec.add_bos, self.spec.bos_id)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos

    def chat(self, prompt: str) -> str:
        return render_chat(self.spec, prompt)


class PackedTokenizer:
    """:class:`SpecTokenizer`'s methods over a packed vocabulary file (an artifact's
    ``tokenizer_vocab_file``): the same ids and text, the vocabulary memory-mapped."""

    def __init__(self, path):
        from runtimes.spm_bpe import SpmBpe

        packed = read_packed(path)
        self._bpe = SpmBpe(packed)
        self.meta = meta = packed.meta
        self._eos = frozenset(meta["eos_ids"])

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        return _with_bos(self._bpe.encode(text, add_special), add_special, self.meta["add_bos"], self.meta["bos_id"])

    def decode(self, ids: Sequence[int]) -> str:
        return self._bpe.decode(ids, skip_special=True)

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def chat_template(self) -> str | None:
        return self.meta.get("chat_template")

    def chat(self, prompt: str) -> str:
        return render_turn(self.chat_template, prompt, self.meta.get("bos_token") or "",
                           self.meta.get("eos_token") or "")


def _with_bos(ids: list[int], add_special: bool, add_bos: bool, bos_id: int | None) -> list[int]:
    """``ids`` with the BOS the tokenizer config asks for, where its template did not put one."""
    if add_special and add_bos and bos_id is not None and ids[:1] != [bos_id]:
        ids.insert(0, bos_id)
    return ids


def render_turn(template: str | None, prompt: str, bos_token: str, eos_token: str) -> str:
    """A single-turn user prompt through ``template`` (generation prompt on); the prompt without one."""
    return render(template, prompt, bos_token=bos_token, eos_token=eos_token) if template else prompt


def render_chat(spec: TokenizerSpec, prompt: str) -> str:
    """Render a single-turn user prompt with the model's chat template (generation prompt on)."""
    tok = lambda i: spec.tokens[i] if i is not None else ""  # noqa: E731
    return render_turn(spec.chat_template, prompt, tok(spec.bos_id), tok(spec.eos_id))


class SpecTextMixin:
    """The Session text methods (tokenize / detokenize / eos_ids / apply_chat_template) over a
    :class:`SpecTokenizer` built on first use. A session defines ``_tokenizer_spec()`` (the
    TokenizerSpec, or None when the model carries none)."""

    _tok: SpecTokenizer | PackedTokenizer | None = None

    def _tokenizer_spec(self) -> TokenizerSpec | None:
        raise NotImplementedError

    def _packed_tokenizer(self):
        """The path of a packed vocabulary to tokenize with instead of the spec (None: the spec)."""
        return None

    @property
    def tokenizer(self) -> SpecTokenizer | PackedTokenizer:
        if self._tok is None:
            packed = self._packed_tokenizer()
            if packed is not None:
                self._tok = PackedTokenizer(packed)
                return self._tok
            spec = self._tokenizer_spec()
            if spec is None:
                raise EdgeqError("this model carries no tokenizer")
            self._tok = SpecTokenizer(spec)
            if getattr(self, "_spec", None) is spec:  # a session's copy read from the artifact: keep the slim one
                self._spec = self._tok.spec
        return self._tok

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    @property
    def eos_ids(self) -> frozenset[int]:
        if self._tok is None and self._packed_tokenizer() is None and self._tokenizer_spec() is None:
            return frozenset()
        return self.tokenizer.eos_ids

    def apply_chat_template(self, prompt: str) -> str:
        return self.tokenizer.chat(prompt)

    @property
    def has_chat_template(self) -> bool:
        if self._packed_tokenizer() is not None:
            return bool(self.tokenizer.chat_template)
        spec = self._tokenizer_spec()
        return spec is not None and bool(spec.chat_template)
