"""How much one tensor's quantization error costs the model's output distribution.

The planner predicts, for each tensor ``t`` and candidate ``c`` (format, rank), the KL divergence
the model's next-token distribution gains when ``t`` alone is stored as ``c``:

    predicted_kl(t, c) = gain_t * err_t(c),    err_t(c) = tr(E_c C_t E_c^T)

``err_t(c)`` is the mean squared output error of the layer on the calibration activations
(``C_t`` its input covariance, ``E_c`` the weight error after quantization and compensation);
``gain_t`` converts that layer-local error into end-to-end KL and is *measured*: ``t`` is replaced
by its round-to-nearest quantization in a reference format (others untouched), the model is run
on calibration sequences (torch, fp32) and ``gain_t = KL / err_t(reference format)``. The first
order model ``KL ∝ err`` holds for small perturbations; measuring the gain at a realistic 4-bit
error keeps it honest where it matters. The residual stream of the unperturbed run is cached at
each layer's input, so perturbing layer ``i`` re-runs layers ``i..L-1`` only.

Tensors without an input covariance (the token embedding, tied to the output head or not) get
their KL measured directly for every candidate type (a handful of forwards).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from edgeq.errors import require
from edgeq.ir import ModelIR, Role
from edgeq.passes.recover import LoraModel

class KLProbe:
    """KL(fp32 model || model with one tensor replaced) on fixed token sequences."""

    def __init__(self, ir: ModelIR, sequences: Sequence[Sequence[int]], threads: int | None = None):
        self.torch = torch = require("torch", "frontend")
        if threads:
            torch.set_num_threads(int(threads))
        self.ir = ir
        self.model = LoraModel(ir, rank=1)
        self.ids = torch.tensor(np.asarray(sequences, dtype=np.int64))
        self.inputs: list = []
        with torch.no_grad():
            self.final = self.model.hidden(self.ids, use_lora=False, collect=self.inputs)
            logits = self.final @ self.model.out_w.T
            self.ref_logp = torch.log_softmax(logits.double(), dim=-1)
            self.ref_p = self.ref_logp.exp()

    def _kl(self, logits) -> float:
        torch = self.torch
        logq = torch.log_softmax(logits.double(), dim=-1)
        return float((self.ref_p * (self.ref_logp - logq)).sum(-1).mean())

    def linear_kl(self, layer: int, role: Role, weight: np.ndarray) -> float:
        """KL with linear (layer, role)'s weight replaced by ``weight``."""
        torch, m = self.torch, self.model
        base = m.base[layer][role]
        m.base[layer][role] = (torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)),) + tuple(base[1:])
        try:
            with torch.no_grad():
                h = m.hidden(self.ids, use_lora=False, start=layer, x=self.inputs[layer])
                return self._kl(h @ m.out_w.T)
        finally:
            m.base[layer][role] = base

    def embedding_kl(self, table: np.ndarray) -> float:
        """KL with the token embedding replaced by ``table`` (and the tied output head with it)."""
        torch, m = self.torch, self.model
        embd, out_w = m.embd, m.out_w
        new = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
        m.embd = new
        if self.ir.hparams.tie_word_embeddings:
            m.out_w = new
        try:
            with torch.no_grad():
                return self._kl(m.logits(self.ids, use_lora=False))
        finally:
            m.embd, m.out_w = embd, out_w

    def output_kl(self, table: np.ndarray) -> float:
        """KL with an untied output head replaced by ``table``."""
        torch = self.torch
        with torch.no_grad():
            return self._kl(self.final @ torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32)).T)


def measure_gains(ir: ModelIR, errors_ref: Mapping[str, float], perturbed: Callable[[str], np.ndarray],
                  probe: KLProbe, progress: bool = True) -> dict[str, float]:
    """gain_t = KL(t perturbed) / err_t for every linear name in ``errors_ref``.

    ``perturbed(name)`` returns the reference-format quantized weight of linear ``name``."""
    names = list(errors_ref)
    it = names
    if progress:
        it = tqdm(names, desc="measuring sensitivity", unit="tensor", leave=False)
    gains: dict[str, float] = {}
    for name in it:
        lin = ir.linears[name]
        kl = max(probe.linear_kl(lin.layer, lin.role, perturbed(name)), 0.0)
        err = errors_ref[name]
        gains[name] = kl / err if err > 0 else 0.0
    return gains
