"""A tiny random Gemma 3 (text) checkpoint for fast tests, generated in code (deterministic).

Shapes: 6 layers (layers 0-4 sliding-window attention, layer 5 global: Gemma 3's 5:1 pattern,
which llama.cpp hard-wires), hidden 64, intermediate 128, 4 heads / 2 KV heads, head_dim 16,
sliding window 8 (so a 20-token test prompt crosses it), RoPE base 1e6 (global) / 1e4 (local),
GELU-tanh GeGLU, QK-norm, sandwich norms, tied embeddings scaled by sqrt(64), norm weights stored
as ``w - 1`` (Gemma's convention) ~ N(0, 0.1). ``query_pre_attn_scalar`` defaults to head_dim
(what llama.cpp's gemma3 graph uses for every size but 27B); another value exercises the
query scaling.

Tokenizer: a SentencePiece-style BPE (as Gemma's): spaces become "▁", byte fallback to
``<0xXX>`` tokens, no dummy prefix; ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2 (prepended),
``<unk>`` 3, ``<start_of_turn>`` 4, ``<end_of_turn>`` 5; vocabulary 384.

Usage: ``python -m models.tiny_gemma3 --out DIR``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeq.errors import EdgeqError, require
from models import CACHE_DIR, atomic_dir, run_main, write_json, write_marker
from models.tiny import (EMBED_STD, HEAD_DIM, HIDDEN, INTERMEDIATE, LINEAR_STD, MAX_POSITIONS, NUM_HEADS,
                         NUM_KV_HEADS, TINY_CORPUS, TINY_VOCAB_SIZE, _randomise_)

GEMMA_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
NUM_LAYERS = 6
SLIDING_WINDOW = 8
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_spm_tokenizer(vocab_size: int = TINY_VOCAB_SIZE, text: str = TINY_CORPUS):
    """A SentencePiece-style BPE shaped as Gemma 3's ``tokenizer.json``: the specials, the 256
    byte-fallback tokens, then BPE pieces trained on ``text`` with spaces as "▁" attached to the
    following word."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    n_fixed = len(GEMMA_SPECIALS) + 256
    probe = Tokenizer(models.BPE())
    probe.normalizer = normalizers.Replace(" ", "▁")
    probe.pre_tokenizer = pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_fixed, min_frequency=1, show_progress=False)
    probe.train_from_iterator(text.splitlines(keepends=False), trainer=trainer)
    learned = sorted(probe.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(GEMMA_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token, _ in learned:
        if token not in vocab:
            vocab[token] = len(vocab)
    if len(vocab) != vocab_size:
        raise EdgeqError(f"tiny gemma3 tokenizer: expected vocab {vocab_size}, got {len(vocab)}")
    import json

    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
              for m in json.loads(probe.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Gemma 3's own pre-tokenizer (a Split on " " after every space became "▁": BPE runs over the
    # whole text); the regex above only keeps the trained merges inside words
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(GEMMA_SPECIALS))
    return tok


def _save_tokenizer(tok, out: Path) -> None:
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tok.to_str())
    tok.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", 2)])
    tok.save(str(out / "tokenizer.json"), pretty=True)
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(GEMMA_SPECIALS)}
    write_json(out / "tokenizer_config.json", {
        **special, "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added,
        "chat_template": GEMMA_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS, "tokenizer_class": "PreTrainedTokenizerFast"})
    write_json(out / "special_tokens_map.json", special)


def make_tiny_gemma3(out_dir: Path, seed: int = 0, query_pre_attn_scalar: int = HEAD_DIM) -> Path:
    """Write a tiny random Gemma 3 text checkpoint to ``out_dir`` (created or replaced); return it."""
    require("torch", "frontend")
    transformers = require("transformers", "frontend")
    import torch

    tok = build_spm_tokenizer()
    config = transformers.Gemma3TextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM, max_position_embeddings=MAX_POSITIONS, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=SLIDING_WINDOW, rms_norm_eps=1e-6,
        tie_word_embeddings=True, initializer_range=LINEAR_STD, use_cache=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0)
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config).to(torch.float32)
    _randomise_(model, seed, EMBED_STD, LINEAR_STD, norm_center=0.0)
    model.tie_weights()
    model.eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        _save_tokenizer(tok, tmp)
        write_marker(tmp, {"recipe": "tiny-gemma3/v1", "seed": seed,
                           "query_pre_attn_scalar": query_pre_attn_scalar})
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.tiny_gemma3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=CACHE_DIR / "tiny" / "tiny-gemma3", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return run_main(lambda: print(f"tiny: wrote tiny-gemma3: {make_tiny_gemma3(args.out, seed=args.seed)}"))


if __name__ == "__main__":
    sys.exit(main())
