"""Write a tiny, loadable F32 llama-architecture GGUF (for tests that drive llama.cpp).

Needs only ``gguf`` (gguf-py) and numpy.  The model is random but structurally complete:
hyper-parameters llama.cpp's ``load_hparams`` reads, every tensor a llama graph needs, and a
minimal sentencepiece-style ("llama") vocabulary: <unk>, <s>, </s>, the 256 byte-fallback
tokens <0x00>..<0xFF> (llama.cpp looks up <0x0A> for the newline token) and a few word pieces.

Usage from a test (tests are not a package; load by path)::

    spec = importlib.util.spec_from_file_location("tiny_gguf", Path(__file__).with_name("tiny_gguf.py"))
    mod = importlib.util.module_from_spec(spec); sys.modules["tiny_gguf"] = mod; spec.loader.exec_module(mod)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class TinyLlamaConfig:
    n_layer: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    n_ctx: int = 128
    extra_pieces: int = 40  # normal tokens after the 3 specials + 256 byte tokens
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def n_vocab(self) -> int:
        return 3 + 256 + self.extra_pieces

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def tiny_vocab(cfg: TinyLlamaConfig) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, token types (gguf TokenType values) of a minimal SPM vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # BYTE
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    pieces = ["\u2581"] + [f"\u2581{c}" for c in letters] + list(letters)
    pieces = pieces[: cfg.extra_pieces]
    assert len(pieces) == cfg.extra_pieces, "extra_pieces too large for the built-in piece list"
    tokens += pieces
    types += [1] * len(pieces)  # NORMAL
    scores = [0.0] * 259 + [-float(i + 1) for i in range(len(pieces))]
    return tokens, scores, types


def tiny_llama_tensors(cfg: TinyLlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors, numpy shapes (rows, cols) as GGUF writers expect (ggml ne reversed)."""
    rng = np.random.default_rng(seed)
    e, f, v = cfg.n_embd, cfg.n_ff, cfg.n_vocab
    kv = cfg.n_head_kv * cfg.head_dim

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    t: dict[str, np.ndarray] = {
        "token_embd.weight": w(v, e),
        "output_norm.weight": np.ones(e, np.float32),
        "output.weight": w(v, e),
    }
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(e)).astype(np.float32)
        t[p + "attn_q.weight"] = w(e, e)
        t[p + "attn_k.weight"] = w(kv, e)
        t[p + "attn_v.weight"] = w(kv, e)
        t[p + "attn_output.weight"] = w(e, e)
        t[p + "ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(e)).astype(np.float32)
        t[p + "ffn_gate.weight"] = w(f, e)
        t[p + "ffn_up.weight"] = w(f, e)
        t[p + "ffn_down.weight"] = w(e, f)
    return t


def write_tiny_llama_gguf(
    path: str | Path,
    cfg: TinyLlamaConfig = TinyLlamaConfig(),
    seed: int = 0,
    edit: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Write an all-F32 tiny llama GGUF to ``path``; return the tensors written (by GGUF name).

    ``edit`` may modify the tensor dict in place (same shapes, float32) before writing, e.g. to
    plant edge-case blocks.
    """
    import gguf

    tensors = tiny_llama_tensors(cfg, seed)
    if edit is not None:
        edit(tensors)
    arch = "llama"
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name("edgeq-tiny-llama")
    wr.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    wr.add_context_length(cfg.n_ctx)
    wr.add_embedding_length(cfg.n_embd)
    wr.add_block_count(cfg.n_layer)
    wr.add_feed_forward_length(cfg.n_ff)
    wr.add_head_count(cfg.n_head)
    wr.add_head_count_kv(cfg.n_head_kv)
    wr.add_rope_dimension_count(cfg.head_dim)
    wr.add_rope_freq_base(cfg.rope_theta)
    wr.add_layer_norm_rms_eps(cfg.rms_eps)
    wr.add_vocab_size(cfg.n_vocab)

    tokens, scores, types = tiny_vocab(cfg)
    wr.add_tokenizer_model("llama")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(tokens)
    wr.add_token_scores(scores)
    wr.add_token_types(types)
    wr.add_unk_token_id(0)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_add_bos_token(True)
    wr.add_add_eos_token(False)

    for name, arr in tensors.items():
        assert arr.dtype == np.float32, name
        wr.add_tensor(name, np.ascontiguousarray(arr))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return tensors
