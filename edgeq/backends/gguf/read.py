"""GGUF model file -> ModelIR (the GGUF front end)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeq.backends.gguf.extents import check_metadata_extents
from edgeq.backends.gguf.layout import (
    GGUF_ARCH,
    ROLE_ORDER,
    gguf_module,
    gguf_tensor_name,
    heads_for,
    interleaved_to_rotate_half,
    layout_names,
    needs_permute,
)
from edgeq.backends.gguf.lazy import GGUFTensor, can_dequantize
from edgeq.backends.gguf.tokenizer import field, read_tokenizer
from edgeq.errors import EdgeqError
from edgeq.hashing import sha256_file
from edgeq.families import Family, by_gguf_arch
from edgeq.ir import HParams, Linear, ModelIR
from edgeq.lazy import is_lazy


def _tensor(path: Path, t, n_head: int = 0) -> "np.ndarray | GGUFTensor":
    """Tensor ``t`` of the reader: a :class:`GGUFTensor` (nothing read) for two or more
    dimensions, else (norms, biases) its float32 values now; the ggml type is checked here."""
    name = t.tensor_type.name
    if not can_dequantize(name):
        raise EdgeqError(f"GGUF: tensor {t.name}: type {name} cannot be dequantized")
    shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
    lazy = GGUFTensor(path, int(t.data_offset), name, shape, n_head=n_head if len(shape) >= 2 else 0)
    return lazy if len(shape) >= 2 else lazy.numpy()


def read_gguf(path: str | Path) -> ModelIR:
    """GGUF model file -> ModelIR (float32 weights, HF rotate-half Q/K order restored).

    Weights are lazy: every matrix is a :class:`~edgeq.backends.gguf.lazy.GGUFTensor` that
    dequantizes on use (whole, or only the rows a step reads) and is never cached; only norms
    and biases are read now. Every tensor's type and byte range is checked here, before any
    step reads it. Supports general.architecture ``llama`` and ``qwen2``; edgeq's own types
    (F16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q6_K) are decoded with edgeq's reference dequantizer,
    other ggml types (BF16, other K- and I-quants) through ``gguf.quants.dequantize``.
    The TokenizerSpec is rebuilt from ``tokenizer.ggml.*``; its ``tokenizer_json`` is a
    reconstructed HF tokenizer.json for byte-level BPE vocabularies with pre-tokenizer ``gpt-2``/``default``/``smollm``/``qwen2``
    and for SentencePiece-style ones (``llama``, with scores: Gemma 3), the empty string ``""``
    for anything else (text tokenization then needs the llama.cpp runtime). Unknown
    architectures and truncated/corrupt files raise a one-line :class:`EdgeqError`.
    """
    gguf = gguf_module()
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(f"{path}: no such file")
    size = path.stat().st_size
    check_metadata_extents(path)  # gguf-py would loop over an array claiming more than the file holds
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - gguf-py raises ValueError/IndexError/... on bad input
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgeqError(f"{path}: not a readable GGUF file (truncated or corrupt?): {msg}") from None
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise EdgeqError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte "
                             f"{int(t.data_offset) + int(t.n_bytes)}, file has {size}")
    try:
        arch_s = field(reader, "general.architecture")
        gtype = field(reader, "general.type")
    except Exception as exc:  # noqa: BLE001
        raise EdgeqError(f"{path}: corrupt GGUF metadata: {exc}") from None
    if gtype == "adapter":
        raise EdgeqError(f"{path}: is a LoRA adapter GGUF, not a model")
    fam = by_gguf_arch(arch_s)
    if fam is None:
        raise EdgeqError(f"{path}: unsupported GGUF architecture {arch_s!r} "
                         f"(supported: {sorted(GGUF_ARCH.values())})")
    try:
        return _read_model(reader, path, fam, arch_s)
    except EdgeqError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise EdgeqError(f"{path}: corrupt GGUF file: {type(exc).__name__}: {exc}") from None


def _f32(v: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v)))


def _read_model(reader, path: Path, fam: Family, a: str) -> ModelIR:
    raw: dict[str, Any] = {t.name: t for t in reader.tensors}

    def req(key: str):
        v = field(reader, f"{a}.{key}")
        if v is None:
            raise EdgeqError(f"{path}: missing metadata {a}.{key}")
        return v

    if "token_embd.weight" not in raw:
        raise EdgeqError(f"{path}: missing tensor token_embd.weight")
    te = raw["token_embd.weight"]
    hidden = int(req("embedding_length"))
    n_head = int(req("attention.head_count"))
    n_kv = int(field(reader, f"{a}.attention.head_count_kv", n_head))
    head_dim = int(field(reader, f"{a}.attention.key_length", hidden // n_head))
    n_layers = int(req("block_count"))
    if not 0 <= n_layers <= len(raw):  # every block holds tensors; names are listed per block below
        raise EdgeqError(f"{path}: corrupt GGUF metadata: {a}.block_count {n_layers} with {len(raw)} tensors")
    hp = HParams(
        arch=fam.arch,
        vocab_size=int(te.shape[1]),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_layers=n_layers,
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rope_theta=_f32(field(reader, f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(req("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(field(reader, f"{a}.context_length", 2048)),
        tie_word_embeddings=gguf_tensor_name("output") not in raw,
        attention_bias="blk.0.attn_q.bias" in raw,
        **fam.gguf_block_hparams(hidden, n_layers, head_dim, field(reader, f"{a}.attention.sliding_window")),
    )

    def get(name: str, n_head: int = 0):
        if name not in raw:
            raise EdgeqError(f"{path}: missing tensor {name}")
        return _tensor(path.resolve(), raw[name], n_head)

    tensors: dict[str, np.ndarray] = {}
    linears: dict[str, Linear] = {}
    roles = {r.value: r for r in ROLE_ORDER}
    for name in layout_names(fam, n_layers):
        parts = name.split(".")
        if name.endswith(".bias"):
            continue  # read with its linear
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in roles:
            i, role = int(parts[1]), roles[parts[2]]
            nh = heads_for(hp, role) if needs_permute(fam.arch, role) else 0
            w = get(gguf_tensor_name(name), nh)  # lazy: the Q/K row permutation is applied on read
            b = get(gguf_tensor_name(f"{name}.bias")) if gguf_tensor_name(f"{name}.bias") in raw else None
            if nh and not is_lazy(w):
                w = interleaved_to_rotate_half(w, nh)
            if nh and b is not None:
                b = interleaved_to_rotate_half(b, nh)
            linears[name] = Linear(name=name, role=role, layer=i,
                                   weight=w if is_lazy(w) else np.ascontiguousarray(w, dtype=np.float32),
                                   bias=None if b is None else np.ascontiguousarray(b, dtype=np.float32))
        elif name == "output" and hp.tie_word_embeddings:
            continue
        else:
            tensors[name] = get(gguf_tensor_name(name))
    known = {gguf_tensor_name(n) for n in tensors} | {f"{n}.weight" for n in linears} | \
        {f"{n}.bias" for n, l in linears.items() if l.bias is not None}
    extra = sorted(set(raw) - known)
    if extra:
        raise EdgeqError(f"{path}: unexpected tensors for a {a} model: {extra[:3]}")
    tok = read_tokenizer(reader)
    name = field(reader, "general.name")
    source = {"kind": "gguf", "path": str(path), "name": name or path.stem,
              "files": {path.name: sha256_file(path)},
              "file_type": field(reader, "general.file_type")}
    ir = ModelIR(hparams=hp, linears=linears, tensors=tensors, tokenizer=tok, source=source)
    ir.validate()
    return ir
