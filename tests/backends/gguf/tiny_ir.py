"""A tiny random ModelIR with a real (synthetic) byte-level BPE tokenizer, random LoRA branches,
and logits of a ModelIR (numpy reference) / a GGUF (llama.cpp): shared by the gguf backend tests
(registered as ``edgeq_tests_gguf_tiny`` by conftest.py: tests are not a package)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from edgeq.ir import Arch, HParams, Linear, LowRank, ModelIR, Role, TokenizerSpec

IDS = [5, 100, 37, 200, 3, 77, 250, 12, 33, 1, 2, 300, 64, 65, 66, 101, 102, 7, 8, 9, 150, 151, 152, 299]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_tokenizer(n_vocab: int) -> TokenizerSpec:
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    n_normal = len(tokens)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += specials
    assert len(tokens) <= n_vocab
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": n_normal + i, "content": s, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i, s in enumerate(specials)],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens[:n_normal])}, "merges": [m.split(" ") for m in merges]},
    }
    tpl = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return TokenizerSpec(tokenizer_json=json.dumps(tj), model="gpt2", pre="gpt-2", tokens=tuple(tokens),
                         token_types=tuple([1] * n_normal + [3] * len(specials)), merges=tuple(merges),
                         bos_id=n_normal + 1, eos_id=n_normal + 2, pad_id=n_normal, unk_id=None, add_bos=False,
                         chat_template=tpl)


def tiny_ir(arch: Arch = Arch.LLAMA, *, seed: int = 0, hidden: int = 64, heads: int = 4, kv: int = 2,
            ffn: int = 96, layers: int = 2, vocab: int = 320, tied: bool = True) -> ModelIR:
    rng = np.random.default_rng(seed)
    bias = arch == Arch.QWEN2
    hp = HParams(arch=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                 num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads, rope_theta=10000.0,
                 rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=tied, attention_bias=bias)
    shapes = ModelIR(hparams=hp, linears={}, tensors={}, tokenizer=None).expected_shapes()
    lin = {}
    for name, shape in shapes.items():
        _, layer, role_s = name.split(".")
        role = Role(role_s)
        w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        b = (0.1 * rng.standard_normal(shape[0])).astype(np.float32) if bias and role in (Role.Q, Role.K, Role.V) else None
        lin[name] = Linear(name=name, role=role, layer=int(layer), weight=w, bias=b)
    t = {"token_embd": (0.2 * rng.standard_normal((vocab, hidden))).astype(np.float32),
         "output_norm": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)}
    if not tied:
        t["output"] = (rng.standard_normal((vocab, hidden)) / np.sqrt(hidden)).astype(np.float32)
    for i in range(layers):
        t[f"blk.{i}.attn_norm"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
        t[f"blk.{i}.ffn_norm"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    ir = ModelIR(hparams=hp, linears=lin, tensors=t, tokenizer=tiny_tokenizer(vocab),
                 source={"name": f"tiny-{arch.value}"})
    ir.validate()
    return ir


def add_lora(ir: ModelIR, name: str, seed: int, roles=tuple(Role), rank: int = 4, alpha: float = 8.0,
             scale: float | None = None) -> ModelIR:
    """Random LoRA branches; odd layers get twice the rank (a per-tensor rank, one alpha)."""
    rng = np.random.default_rng(seed)
    lins = dict(ir.linears)
    for k, l in lins.items():
        if l.role not in roles:
            continue
        r = rank if l.layer % 2 == 0 else 2 * rank
        a = (0.1 * rng.standard_normal((r, l.in_features))).astype(np.float32)
        b = (0.1 * rng.standard_normal((l.out_features, r))).astype(np.float32)
        lins[k] = dataclasses.replace(l, low_rank=l.low_rank + (
            LowRank(a=a, b=b, scale=alpha / r if scale is None else scale, source=f"lora:{name}"),))
    return ir.replace(linears=lins)


def reference_logits(ir: ModelIR, ids=IDS) -> np.ndarray:
    from runtimes.reference import ReferenceSession

    return ReferenceSession(ir, n_ctx=64).logits(ids)


def llamacpp_logits(path, ids=IDS, lora_paths=()) -> np.ndarray:
    import llama_cpp  # noqa: F401
    from runtimes.llamacpp import LlamaCppSession

    with LlamaCppSession(path, lora_paths=lora_paths, n_ctx=64, kv_cache_type="f32") as s:
        return s.logits(ids)


ARCH_TIED = [(Arch.LLAMA, True), (Arch.LLAMA, False), (Arch.QWEN2, True), (Arch.QWEN2, False)]
