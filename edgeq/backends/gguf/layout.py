"""Where a ModelIR's tensors go in a llama.cpp GGUF: architecture and tensor names, file order,
and the Q/K row permutation between Hugging Face's rotate-half RoPE and llama.cpp's adjacent
pairs. The facts come from the family tables (:mod:`edgeq.families`).

* llama.cpp's ``llama`` architecture applies RoPE to adjacent pairs ``(2j, 2j+1)`` (rope type
  NORM) while Hugging Face Llama rotates halves ``(j, j + d/2)``; ``convert_hf_to_gguf.py``
  therefore permutes the rows of Q and K (per head) on the way in. We do the same (also to Q/K
  biases and to LoRA ``B`` matrices of Q/K) and undo it in :func:`edgeq.backends.gguf.read.read_gguf`.
  The ``qwen2`` architecture uses rope type NEOX (rotate-half), so no permutation
  (``Family.gguf_permute_qk``).
* gguf-py writes numpy arrays with the last axis as ggml's ``ne[0]``, so a ``(out, in)`` weight
  is a ggml ``[in, out]`` tensor, exactly what llama.cpp expects; quantized rows run along
  ``in``.
"""
from __future__ import annotations

import numpy as np

from edgeq.errors import EdgeqError, require
from edgeq.families import FAMILIES, LINEAR_ROLES, Family, family
from edgeq.ir import Arch, HParams, Linear, ModelIR, Role

# Arch -> general.architecture
GGUF_ARCH: dict[Arch, str] = {f.arch: f.gguf_arch for f in FAMILIES}
ROLE_ORDER = LINEAR_ROLES


def gguf_module():
    """gguf-py (an optional dependency: a clear error when it is missing)."""
    return require("gguf", "gguf")


def gguf_tensor_name(ir_name: str) -> str:
    """IR name -> GGUF tensor name: ``blk.0.attn_q`` -> ``blk.0.attn_q.weight``;
    ``blk.0.attn_q.bias`` stays as it is (the families' ``gguf_tensors`` tables)."""
    return ir_name if ir_name.endswith(".bias") else f"{ir_name}.weight"


def heads_for(hp: HParams, role: Role) -> int:
    return hp.num_heads if role == Role.Q else hp.num_kv_heads


def rotate_half_to_interleaved(x: np.ndarray, n_head: int) -> np.ndarray:
    """Permute rows (axis 0) per head from HF rotate-half order to llama.cpp's adjacent pairs
    (``LlamaModel.permute`` in convert_hf_to_gguf.py)."""
    rest = x.shape[1:]
    hd = x.shape[0] // n_head
    return np.ascontiguousarray(x.reshape(n_head, 2, hd // 2, *rest).swapaxes(1, 2).reshape(x.shape))


def interleaved_to_rotate_half(x: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`rotate_half_to_interleaved`."""
    rest = x.shape[1:]
    hd = x.shape[0] // n_head
    return np.ascontiguousarray(x.reshape(n_head, hd // 2, 2, *rest).swapaxes(1, 2).reshape(x.shape))


def needs_permute(arch: Arch, role: Role) -> bool:
    return family(arch).gguf_permute_qk and role in (Role.Q, Role.K)


def out_rows(ir: ModelIR, lin: Linear, x: np.ndarray) -> np.ndarray:
    """Rows of an output-side array (weight, bias, LoRA B) in llama.cpp order."""
    if needs_permute(ir.arch, lin.role):
        return rotate_half_to_interleaved(x, heads_for(ir.hparams, lin.role))
    return x


def layout_names(fam: Family, num_layers: int) -> list[str]:
    """Every IR name the family's GGUF layout can hold, in file order: the entries before the
    first ``{bid}`` one, then each block's, then the rest."""
    pats = list(fam.gguf_tensors)
    block = [p for p in pats if "{bid}" in p]
    first = pats.index(block[0]) if block else len(pats)
    head = [p for p in pats[:first] if "{bid}" not in p]
    tail = [p for p in pats[first:] if "{bid}" not in p]
    return head + [p.format(bid=i) for i in range(num_layers) for p in block] + tail


def tensor_shapes(ir: ModelIR) -> dict[str, tuple[int, ...]]:
    """IR name -> numpy shape of every tensor a model GGUF of ``ir`` holds, in file order.

    Linears are required; a bias is written when the linear has one; ``output`` only for
    untied embeddings; other tensors (embeddings, norms) come from ``ir.tensors``."""
    hp = ir.hparams
    out: dict[str, tuple[int, ...]] = {}
    for name in layout_names(family(hp.arch), hp.num_layers):
        if name.endswith(".bias"):
            lin = ir.linears.get(name[: -len(".bias")])
            if lin is not None and lin.bias is not None:
                out[name] = tuple(lin.bias.shape)
        elif name in ir.linears:
            out[name] = tuple(ir.linears[name].weight.shape)
        elif name.startswith("blk.") and name.split(".")[2] in {r.value for r in Role}:
            raise EdgeqError(f"GGUF: missing linear {name}")
        elif name == "output" and hp.tie_word_embeddings:
            continue
        elif name in ir.tensors:
            out[name] = tuple(int(s) for s in ir.tensors[name].shape)
    return out
