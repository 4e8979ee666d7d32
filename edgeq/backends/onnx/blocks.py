"""The ONNX graph pieces of the family blocks beyond the Llama forward (``HParams.special_blocks``:
Gemma 3's), each read from the IR's hyper-parameters, never from the architecture's name:

* the MLP's gate activation (``hidden_act``): SiLU, or GELU with the tanh approximation (opset-20
  ``Gelu``, ``approximate="tanh"``) for a GeGLU;
* token embeddings multiplied by ``embedding_scale`` (float32, as the reference runtime does);
* QK-norm: an ``RMSNormalization`` of every Q / K head over head_dim, before RoPE;
* sandwich norms: the attention and MLP outputs normalised before their residual adds;
* sliding-window layers: keys at or beyond ``sliding_window`` positions behind the query masked
  (an additive mask beside the causal one in the plain-op attention; ``local_window_size`` of a
  GroupQueryAttention node), with the layer's own RoPE base (``HParams.layer_rope_theta``).

Norm weights are the IR's effective multipliers (Gemma's ``1 + w`` already applied by its front
end), so one ``RMSNormalization`` serves every family.
"""
from __future__ import annotations

import numpy as np


def gated(g, gate: str, up: str, act: str, layer: int) -> str:
    """``act(gate) * up``: SwiGLU (``silu``) or GeGLU (``gelu_tanh``)."""
    if act == "silu":
        a = g.op("Mul", [gate, g.op("Sigmoid", [gate])], name=f"blk.{layer}.silu")
        return g.op("Mul", [a, up], name=f"blk.{layer}.swiglu")
    if act == "gelu_tanh":
        a = g.op("Gelu", [gate], name=f"blk.{layer}.gelu", approximate="tanh")
        return g.op("Mul", [a, up], name=f"blk.{layer}.geglu")
    from edgeq.errors import EdgeqError

    raise EdgeqError(f"cannot lower to onnx: MLP activation {act!r} (onnx lowers silu, gelu_tanh)")


def scaled_embedding(g, x: str, hp) -> str:
    """The embedding rows times ``hp.embedding_scale`` (identity at 1)."""
    if hp.embedding_scale == 1.0:
        return x
    return g.op("Mul", [x, g.const(np.float32(hp.embedding_scale), np.float32)], name="token_embd.scaled")


def head_norm(d, x: str, n: int, name: str) -> str:
    """RMSNorm of each of the ``n`` heads of ``x`` (1, S, n * head_dim) over its head_dim, with
    the IR's ``name`` weight (head_dim,); identity without QK-norm."""
    hp, g = d.ir.hparams, d.g
    if not hp.qk_norm:
        return x
    D = hp.head_dim
    w = g.init(f"{name}.weight", d.ir.tensors[name].astype(np.float32))
    heads = g.op("Reshape", [x, g.const([1, -1, n, D])], name=f"{name}.heads")
    y = g.op("RMSNormalization", [heads, w], name=name, axis=-1, epsilon=float(hp.rms_norm_eps))
    return g.op("Reshape", [y, g.const([1, -1, n * D])], name=f"{name}.rows")


def post_norm(d, y: str, name: str) -> str:
    """The sandwich norm ``name`` on a block's output (identity without sandwich norms)."""
    return d.rms_norm(y, name) if d.ir.hparams.sandwich_norm else y


def window_mask(g, q_pos: str, k_pos: str, causal: str, window: int) -> str:
    """``causal`` (S, T) with the keys ``window`` or more positions behind each query also masked."""
    dist = g.op("Sub", [g.op("Unsqueeze", [q_pos, g.const([1])]), g.op("Unsqueeze", [k_pos, g.const([0])])],
                name="window.distance")  # (S, T): query position - key position
    far = g.op("GreaterOrEqual", [dist, g.const(window)], name="window.far")
    return g.op("Where", [far, g.const(np.float32(-np.inf), np.float32), causal], name="window_mask")


def gqa_window(hp, layer: int) -> int:
    """GroupQueryAttention's ``local_window_size`` for ``layer``: -1 (global), else the keys a query
    sees, itself included — onnxruntime 1.32's CPU kernel masks keys ``window`` or more positions
    behind the query, as Gemma's sliding window does (tests/backends/onnx/test_gemma3.py checks it
    against the plain-op mask and transformers, prompt and decode)."""
    return hp.sliding_window if hp.is_sliding(layer) else -1
