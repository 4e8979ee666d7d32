"""The raw inputs of a model's linears on token sequences, from the reference runtime's taps at
rate 0 — an oracle independent of ``edgeq.calibrate`` (which sums them into statistics) for the
pruning tests. (Importable as ``activation_taps``: tests/conftest.py puts tests/ on the path.)"""
from __future__ import annotations

import numpy as np

from edgeq.ir import full_widths
from runtimes.reference import LayerWeights, layer_forward, pruning_layout, rope_inv_freq


def tapped(ir, seqs, names=("down_in", "o_in")) -> dict[int, dict[str, np.ndarray]]:
    """Per layer, the tapped activations ``names`` of every token of ``seqs`` (float64, tokens x
    columns; ``o_in`` in the IR's column order, head-major)."""
    hp = ir.hparams
    o_ir = np.argsort(pruning_layout(hp)[3])  # runtime column order -> IR order
    widths, inv_freq = full_widths(hp), rope_inv_freq(hp.head_dim, hp.rope_theta)
    out = {li: {n: [] for n in names} for li in range(hp.num_layers)}
    for seq in seqs:
        x = np.asarray(ir.tensors["token_embd"], np.float32)[np.asarray(seq)]
        T = len(seq)
        kc = np.zeros((T, hp.num_kv_heads, 2, hp.head_dim // 2), np.float32)
        vc = np.zeros((T, hp.num_kv_heads, hp.head_dim), np.float32)
        for li in range(hp.num_layers):
            def tap(name, a, li=li):
                if name in names:
                    a = np.array(a, dtype=np.float64)
                    out[li][name].append(a[:, o_ir] if name == "o_in" else a)
            x = layer_forward(hp, LayerWeights(ir, li, np.float32), x, 0, widths, kc, vc, inv_freq, np.float32,
                              taps=tap)
    return {li: {k: np.concatenate(v) for k, v in d.items()} for li, d in out.items()}
