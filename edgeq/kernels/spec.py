"""What one generated kernel computes, and the weight layout it reads.

A kernel computes, for activations ``x`` (M, K) and a group-quantized weight W (N, K),

    y = x · deq(W)ᵀ + (x · Aᵀ) · Bᵀ          (the low-rank term only when ``rank > 0``)

with ``deq(W)[n, k] = s[n, g] * (q[n, k] - z[n, g])``, ``g = k // group`` (``z`` = 2**(bits-1) for
symmetric formats). ``A`` (rank, K) and ``B`` (N, rank) carry a LoRA branch kept separate and/or
an error-compensation branch (their sum, scale folded into ``B``).

Layout (:mod:`edgeq.kernels.layout`): output channels in blocks of ``block`` (the vector width of
the target), so that for one input position the codes of ``block`` consecutive output channels
are contiguous — a kernel loads them with one vector load and accumulates ``block`` outputs at
once without a horizontal sum:

* ``qw``  uint8 (N / block, K * bits / 8, block): 4-bit codes of positions 2i (low nibble) and
  2i+1 (high nibble) share a byte; 8-bit codes one byte each;
* ``sc``  float32 (N / block, K / group, block); ``zp`` float32, same shape (asymmetric only);
* ``b``   float32 (N / block, rank, block) (``B`` blocked the same way); ``a`` float32 (K, rank)
  (``Aᵀ``: the kernel accumulates ``t = x · Aᵀ`` vectorized over the rank).

**int8 activations** (``act="int8"``, :mod:`edgeq.kernels.tir_dot`): the kernel quantizes ``x`` to
int8 per weight group (a float32 scale ``amax / 127`` per group and row) and accumulates the group
in int32 with the target's integer dot instruction (x86 ``vpdpbusd``: AVX-512 VNNI / AVX-VNNI;
aarch64 ``sdot``), then ``y += dx * s * (Σ xq·q − z·Σ xq)`` per group in float. The dot
instructions sum 4 consecutive bytes per 32-bit lane, so ``qw`` has its own layout there:

* ``qw``  uint8 (N / block, K * bits / 32, 4 * block): word ``c`` of lane ``j`` is bytes
  ``4 j .. 4 j + 3``; 8-bit: the codes of positions ``4 c .. 4 c + 3``; 4-bit: the low nibbles hold
  positions ``8 c .. 8 c + 3``, the high nibbles ``8 c + 4 .. 8 c + 7``.

A prefix of output channels is a prefix of blocks and a prefix of input channels is a prefix of
every block's rows, so the kernels take the *active* widths from the shapes of ``x`` (K) and ``y``
(N) at call time: one compiled function serves every pruning rate (and every layer shape).
"""
from __future__ import annotations

from dataclasses import dataclass

from edgeq.errors import EdgeqError

BITS = (4, 8)
GROUPS = (32, 64, 128)
ACTS = ("float32", "int8")  # activations as given, or quantized to int8 per group (integer dot products)


@dataclass(frozen=True)
class KernelSpec:
    bits: int = 4
    group: int = 32
    symmetric: bool = True
    rank: int = 0  # 0: no low-rank branch
    block: int = 8  # output channels per vector block (the layout's and the schedule's width)
    prefill: bool = False  # M > 1 variant: each weight tile dequantized once, reused over the rows
    lr_dtype: str = "float32"  # storage of the low-rank factors: float32 | float16 (computed in float32)
    act: str = "float32"  # float32 | int8 (activations quantized per group, integer dot products)

    def __post_init__(self):
        if self.bits not in BITS:
            raise EdgeqError(f"kernel bits must be one of {BITS}, got {self.bits}")
        if self.group not in GROUPS:
            raise EdgeqError(f"kernel group must be one of {GROUPS}, got {self.group}")
        if self.lr_dtype not in ("float32", "float16"):
            raise EdgeqError(f"kernel low-rank dtype must be float32 or float16, got {self.lr_dtype}")
        if self.act not in ACTS:
            raise EdgeqError(f"kernel activations must be one of {ACTS}, got {self.act}")
        if self.rank < 0 or self.block <= 0 or self.block & (self.block - 1):
            raise EdgeqError(f"kernel rank must be >= 0 and block a power of two, got {self.rank}, {self.block}")

    @property
    def zero_point(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def name(self) -> str:
        h = "h" if self.rank and self.lr_dtype == "float16" else ""
        q = "_q8" if self.act == "int8" else ""
        return (f"qgemm_i{self.bits}g{self.group}{'s' if self.symmetric else 'a'}_r{self.rank}{h}_b{self.block}{q}_"
                f"{'prefill' if self.prefill else 'decode'}")

    @property
    def dot_layout(self) -> bool:
        """``qw`` in the integer-dot layout (4 bytes of one lane contiguous) rather than the float one."""
        return self.act == "int8"

    def args(self) -> list[str]:
        """The kernel's arguments, in order (all tensors; ``y`` is written)."""
        return ["x", "qw", "sc"] + ([] if self.symmetric else ["zp"]) + (["a", "b"] if self.rank else []) + ["y"]
