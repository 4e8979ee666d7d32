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

That probe (``"kl-probe"``, the default) costs one tail re-run per tensor: O(layers^2) layer
forwards (312 s of a 439 s planned SmolLM2 build). ``"fisher"`` (:func:`fisher_gains`) predicts the same
KL to second order from one forward and a few backward passes for *all* tensors at once:
the KL's Hessian at the unperturbed model is the Fisher information, so for the output
perturbation ``delta_t = X dW_t^T`` of tensor ``t`` (``dW_t`` its reference-format error)

    KL_t ~= 1/2 delta_t^T F delta_t = 1/2 E_{y ~ p}[(grad log p(y) . delta_t)^2]

The directional derivative ``grad log p(y) . delta_t`` of every tensor comes out of one backward
pass (the forward adds ``eps_t * delta_t`` to the tensor's output, ``d/d eps_t`` is it), labels
``y`` are sampled from the model's own distribution at every position (cross-position terms
vanish in expectation), one ``eps`` per tensor and sequence (sequences are independent: more
samples for the same backward passes). Cost: O(parameters x samples), no tail re-runs.

Tensors without an input covariance (the token embedding, tied to the output head or not) get
their KL measured directly for every candidate type (a handful of forwards).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from edgeq.errors import require
from edgeq.ir import ModelIR, Role
from edgeq.passes.lora_model import LoraModel

SENSITIVITIES = ("fisher", "kl-probe")
# Label samples (backward passes) of the Fisher estimate: each tensor's KL comes from
# samples x sequences squared directional derivatives (relative noise ~ sqrt(2 / that)).
FISHER_SAMPLES = 16


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

    def fisher_kl(self, deltas: Mapping[tuple[int, Role], np.ndarray], samples: int = FISHER_SAMPLES,
                  seed: int = 0) -> dict[tuple[int, Role], float]:
        """Second-order KL (mean over positions, as :meth:`linear_kl`) of replacing each linear
        (layer, role)'s weight ``W`` by ``W - deltas[(layer, role)]``, one at a time, for all of
        them from one forward and ``samples`` backward passes (the module doc)."""
        torch, m = self.torch, self.model
        F = torch.nn.functional
        B, T = self.ids.shape
        eps = {key: torch.zeros(B, dtype=torch.float32, requires_grad=True) for key in deltas}
        dws = {key: torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)) for key, d in deltas.items()}
        linear = m._linear

        def probed(x, layer, role, use_lora, rows=None, cols=None):
            y = linear(x, layer, role, use_lora, rows, cols)
            key = (layer, role)
            if key in eps:
                assert rows is None and cols is None  # the probe runs at full width
                y = y + eps[key].view(B, 1, 1) * F.linear(x, dws[key])
            return y

        m._linear = probed
        try:
            h = m.hidden(self.ids, use_lora=False).reshape(B * T, -1)  # final-normed hidden states
        finally:
            del m._linear
        # d log p(y) / d h = W_out[y] - p @ W_out (log-softmax of h @ W_out^T): the head's backward
        # once for all samples, a row gather per sample
        out_w = m.out_w
        p = self.ref_p.reshape(B * T, -1).float()
        mean_row = p @ out_w
        gen = torch.Generator().manual_seed(int(seed))
        keys = list(eps)
        acc = [torch.zeros(B, dtype=torch.float64) for _ in keys]
        for s in range(samples):
            y = torch.multinomial(p, 1, generator=gen)[:, 0]  # one label per position from the model itself
            grads = torch.autograd.grad(h, [eps[k] for k in keys], grad_outputs=out_w[y] - mean_row,
                                        retain_graph=s < samples - 1)
            for a, g in zip(acc, grads):
                a += g.double() ** 2
        return {k: float(a.sum()) / samples / (2 * B * T) for k, a in zip(keys, acc)}

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


def fisher_gains(ir: ModelIR, errors_ref: Mapping[str, float], perturbed: Callable[[str], np.ndarray],
                 probe: KLProbe, samples: int = FISHER_SAMPLES) -> dict[str, float]:
    """gain_t = (second-order KL of t perturbed) / err_t for every linear name in ``errors_ref``,
    all at once (:meth:`KLProbe.fisher_kl`); ``perturbed(name)`` as for :func:`measure_gains`."""
    names = list(errors_ref)
    deltas = {}
    for name in names:
        lin = ir.linears[name]
        deltas[(lin.layer, lin.role)] = np.asarray(lin.weight, dtype=np.float32) - np.asarray(
            perturbed(name), dtype=np.float32)
    kls = probe.fisher_kl(deltas, samples=samples)
    gains: dict[str, float] = {}
    for name in names:
        lin = ir.linears[name]
        err = errors_ref[name]
        gains[name] = kls[(lin.layer, lin.role)] / err if err > 0 else 0.0
    return gains


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
