"""Tiny random Llama / Qwen2 checkpoints and random LoRA adapters for fast tests.

Everything is generated in code and deterministic from a seed: the same call writes
byte-identical files. The checkpoints are real Hugging Face directories (config.json,
model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
special_tokens_map.json) with a real byte-level BPE tokenizer trained on a built-in text.

Shapes (both archs): 2 layers, hidden 64, intermediate 128, 4 heads / 2 KV heads (GQA),
head_dim 16, vocab 384 — every hidden/intermediate dimension a multiple of 32 (a quant block).

* tiny Llama: rope_theta 10000, rms eps 1e-5, no biases, untied embeddings by default;
  GPT-2-style byte-level BPE that prepends BOS (``<|endoftext|>``, id 0) like Llama-3's.
* tiny Qwen2: q/k/v biases, rope_theta 1e6, rms eps 1e-6, tied embeddings by default;
  Qwen2-style byte-level BPE (NFC + Qwen2 split regex), no BOS. (transformers' Qwen2Tokenizer
  rebuilds that pipeline whatever tokenizer.json says, so a GPT-2 pipeline would not load as
  written.)
Special tokens (both): ``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2 (eos).

Usage (from the repository root)::

    python -m models.tiny --out DIR   # DIR/tiny-llama, DIR/tiny-qwen2, DIR/tiny-{llama,qwen2}-lora
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from edgeq.errors import EdgeqError, require
from models import CACHE_DIR, atomic_dir, canonicalise_adapter_config, run_main, write_json, write_marker

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
TINY_VOCAB_SIZE = 384  # 256 byte symbols + 3 specials + 125 merges; a multiple of 32
HIDDEN = 64
INTERMEDIATE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
MAX_POSITIONS = 512
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Initialisation scales: give logits a spread of O(1) (softmax neither flat nor one-hot).
EMBED_STD = 0.1
LINEAR_STD = 0.06
BIAS_STD = 0.05
NORM_STD = 0.1  # norm weights ~ N(1, NORM_STD): deliberately not all ones
LORA_STD = 0.05

CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Fixed training text for the tiny tokenizer (built in, so the tokenizer never depends on data).
TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still tell a story, one token
at a time. Once upon a time there was a little robot who lived in a quiet town by the sea.
Every morning the robot walked to the harbour, counted the boats, and wrote the number in a
notebook. On Monday there were three boats; on Tuesday there were seven; on Wednesday the
weather was stormy and there were none at all.

Question: What is the capital of France?
Answer: The capital of France is Paris.

Question: How many legs does a spider have?
Answer: A spider has eight legs.

Instruction: Give three tips for staying healthy.
Response: Eat a balanced diet with plenty of fruits and vegetables. Exercise regularly to keep
your body active and strong. Get enough sleep and keep a consistent schedule.

Instruction: Translate the sentence into French: I like apples.
Response: J'aime les pommes.

Instruction: Write a short poem about the moon.
Response: The moon is bright, the night is long, the stars are quiet, the wind is strong.

It's important that the tokenizer sees contractions like don't, can't, won't, I'm, you're,
they've and we'll, numbers like 0 1 2 3 4 5 6 7 8 9, 10, 42, 100 and 2024, punctuation such as
commas, periods, colons: semicolons; question marks? exclamation marks! (parentheses) and
"quotes", as well as newlines and    extra   spaces. Python code looks like this:

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

Edge devices have little memory, so models are quantized to four bits and pruned to fit.
The compiler reads the checkpoint, merges the adapter, quantizes the weights, and writes an
artifact that the runtime can load. Then it checks that the answers still match.
"""


# Qwen2's pre-tokenizer split (digits one by one, letters with one leading non-letter).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tiny_tokenizer(style: str = "gpt2", vocab_size: int = TINY_VOCAB_SIZE, text: str = TINY_CORPUS):
    """Train a byte-level BPE on ``text``; special tokens get ids 0, 1, 2.

    ``style="gpt2"``: GPT-2 pre-tokenizer (ByteLevel with its regex), as Llama-3/SmolLM-style
    byte-level tokenizers. ``style="qwen2"``: NFC normalizer + Qwen2's split regex + ByteLevel,
    exactly the pipeline of real Qwen2 tokenizers (transformers' Qwen2Tokenizer rebuilds that
    pipeline itself, so anything else would load differently than tokenizer.json says).
    Returns a ``tokenizers.Tokenizer`` (post-processor set by :func:`save_tokenizer`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    elif style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    else:
        raise EdgeqError(f"tiny tokenizer: expected style 'gpt2' or 'qwen2', got {style!r}")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise EdgeqError(f"tiny tokenizer: expected vocab {vocab_size}, got {tok.get_vocab_size()}")
    for idx, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != idx:
            raise EdgeqError(f"tiny tokenizer: expected {token} = {idx}, got {tok.token_to_id(token)}")
    return tok


def save_tokenizer(tok, out_dir: Path, *, bos: str | None, eos: str, pad: str, add_bos: bool,
                   tokenizer_class: str = "PreTrainedTokenizerFast",
                   chat_template: str = CHAT_TEMPLATE) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out_dir``.

    When ``add_bos`` the tokenizer.json carries a TemplateProcessing post-processor that
    prepends ``bos``, so the bare ``tokenizers`` library and transformers agree.
    """
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tok.to_str())  # don't mutate the caller's tokenizer
    if add_bos:
        if bos is None:
            raise EdgeqError("add_bos requires a bos token")
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    special = {"eos_token": eos, "pad_token": pad, "unk_token": None}
    special["bos_token"] = bos
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    config = {
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "tokenizer_class": tokenizer_class,
    }
    write_json(out_dir / "tokenizer_config.json", config)
    write_json(out_dir / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})


def _randomise_(model, seed: int, embed_std: float = EMBED_STD, linear_std: float = LINEAR_STD,
                norm_center: float = 1.0) -> None:
    """Overwrite every parameter from a seeded generator, in sorted name order. ``norm_center``:
    the mean of the stored norm weights (0 for Gemma, whose checkpoints store ``w - 1``)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.copy_(norm_center + NORM_STD * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name or name.startswith("lm_head"):
                p.copy_(embed_std * torch.randn(p.shape, generator=gen))
            elif name.endswith(".weight") and p.dim() == 2:
                p.copy_(linear_std * torch.randn(p.shape, generator=gen))
            else:
                raise EdgeqError(f"tiny model: no init rule for parameter {name} {tuple(p.shape)}")


def _make_tiny(out_dir: Path, arch: str, seed: int, tie_embeddings: bool, embed_std: float = EMBED_STD,
               linear_std: float = LINEAR_STD, num_layers: int = NUM_LAYERS) -> Path:
    require("torch", "frontend")
    transformers = require("transformers", "frontend")
    import torch

    tok = build_tiny_tokenizer("qwen2" if arch == "qwen2" else "gpt2")
    common = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=num_layers, num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM, max_position_embeddings=MAX_POSITIONS, hidden_act="silu",
        tie_word_embeddings=tie_embeddings, initializer_range=LINEAR_STD, use_cache=True,
    )
    if arch == "llama":
        bos, eos, pad, add_bos = SPECIAL_TOKENS[0], SPECIAL_TOKENS[2], SPECIAL_TOKENS[0], True
        tok_class = "PreTrainedTokenizerFast"
        config = transformers.LlamaConfig(
            **common, rope_theta=10000.0, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
            bos_token_id=0, eos_token_id=2, pad_token_id=0)
        model_cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        bos, eos, pad, add_bos = None, SPECIAL_TOKENS[2], SPECIAL_TOKENS[0], False
        tok_class = "Qwen2Tokenizer"
        config = transformers.Qwen2Config(
            **common, rope_theta=1_000_000.0, rms_norm_eps=1e-6, use_sliding_window=False,
            bos_token_id=0, eos_token_id=2, pad_token_id=0)
        model_cls = transformers.Qwen2ForCausalLM
    else:  # pragma: no cover - internal
        raise EdgeqError(f"unknown tiny arch {arch!r}")
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    _randomise_(model, seed, embed_std, linear_std)
    if tie_embeddings:
        model.tie_weights()
    model.eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=0)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        save_tokenizer(tok, tmp, bos=bos, eos=eos, pad=pad, add_bos=add_bos, tokenizer_class=tok_class)
        marker = {"recipe": f"tiny-{arch}/v1", "seed": seed, "tie_embeddings": tie_embeddings}
        if (embed_std, linear_std) != (EMBED_STD, LINEAR_STD):
            marker.update(embed_std=embed_std, linear_std=linear_std)
        if num_layers != NUM_LAYERS:
            marker.update(num_layers=num_layers)
        write_marker(tmp, marker)
    return out_dir


def make_tiny_llama(out_dir: Path, seed: int = 0, tie_embeddings: bool = False, embed_std: float = EMBED_STD,
                    linear_std: float = LINEAR_STD, num_layers: int = NUM_LAYERS) -> Path:
    """Write a tiny random Llama checkpoint to ``out_dir`` (created or replaced); return it.
    ``embed_std`` / ``linear_std`` change the initialisation scales (e.g. a small ``embed_std``
    gives near-flat next-token distributions, a large ``linear_std`` a model 4-bit rounding
    moves a lot; many layers of large weights, a model that amplifies any rounding)."""
    return _make_tiny(out_dir, "llama", seed, tie_embeddings, embed_std, linear_std, num_layers)


def make_tiny_qwen2(out_dir: Path, seed: int = 0, tie_embeddings: bool = True) -> Path:
    """Write a tiny random Qwen2 checkpoint (q/k/v biases, rope_theta 1e6) to ``out_dir``."""
    return _make_tiny(out_dir, "qwen2", seed, tie_embeddings)


def make_random_lora(model_dir: Path, out_dir: Path, r: int = 8, alpha: int = 16,
                     target_modules: Sequence[str] = LORA_TARGETS, seed: int = 0) -> Path:
    """Write a PEFT LoRA adapter for the checkpoint at ``model_dir`` with random, non-zero A and
    B (so it changes the outputs): ``out_dir/adapter_config.json`` + ``adapter_model.safetensors``.
    """
    require("torch", "frontend")
    require("transformers", "frontend")
    require("peft", "frontend")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(LORA_STD * torch.randn(p.shape, generator=gen))
                n += 1
    if n == 0:
        raise EdgeqError(f"no LoRA parameters created for target modules {list(target_modules)}")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model card; not needed
        canonicalise_adapter_config(tmp / "adapter_config.json")
        write_marker(tmp, {"recipe": "random-lora/v1", "seed": seed, "r": r, "alpha": alpha})
    return out_dir


def make_all(out: Path, seed: int = 0) -> dict[str, Path]:
    """The CLI's job: tiny-llama, tiny-qwen2 and a random LoRA for each under ``out``."""
    out = Path(out)
    paths = {
        "tiny-llama": make_tiny_llama(out / "tiny-llama", seed=seed),
        "tiny-qwen2": make_tiny_qwen2(out / "tiny-qwen2", seed=seed),
    }
    paths["tiny-llama-lora"] = make_random_lora(paths["tiny-llama"], out / "tiny-llama-lora", seed=seed)
    paths["tiny-qwen2-lora"] = make_random_lora(paths["tiny-qwen2"], out / "tiny-qwen2-lora", seed=seed)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=CACHE_DIR / "tiny", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def body() -> None:
        for name, path in make_all(args.out, seed=args.seed).items():
            print(f"tiny: wrote {name}: {path}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
