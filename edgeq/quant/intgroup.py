"""Generic int4 / int8 group quantization, for ONNX Runtime's ``com.microsoft.MatMulNBits`` and TVM.

A weight ``W`` of shape ``(N, K)`` (``N`` outputs, ``K`` inputs, the ``nn.Linear`` layout) is cut
along ``K`` into groups of ``group`` values.  Each group has one scale (rounded to fp16, kept as
float32) and codes ``q`` in ``[0, 2**bits - 1]``:

* symmetric (``int4_g32_sym``): ``value = scale * (q - 2**(bits-1))``; the implicit zero point is
  the one MatMulNBits uses when its ``zero_points`` input is absent (8 for 4-bit, 128 for 8-bit).
  Scale rule (the Q4_0 one): ``scale = vmax / -2**(bits-1)`` with ``vmax`` the *signed* value of
  the group's largest magnitude, so that element lands exactly on code 0 (the extra negative
  level of the two's-complement range) and the others within ``[-2**(bits-1), 2**(bits-1)]``
  steps, the top one clipped to ``2**(bits-1) - 1``.
* asymmetric (``int8_g128_asym``): ``value = scale * (q - zp)`` with an integer zero point ``zp``
  in ``[0, 2**bits - 1]``.  ``lo = min(min(x), 0)``, ``hi = max(max(x), 0)`` (zero must be in the
  range since ``q = zp`` decodes to 0); ``scale = (hi - lo) / (2**bits - 1)``,
  ``zp = clip(round(-lo / scale))``.

Given an importance ``weight`` (e.g. a Hessian diagonal), ``fit`` also tries a few clipped
ranges (the range shrunk by up to 25%) and keeps, per group, the one with the least weighted
squared error.  Codes are always the nearest representable values (``IntGroupCodec.encode``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.quant.blockops import f16_bytes, f16_finite, f16_from, first_absmax, importance_weights
from edgeq.quant import storage
from edgeq.quant.codecs import Codec, Params, codec_for

_F32 = np.float32
_SHRINK = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76)


@dataclass(frozen=True)
class IntGroupFormat:
    bits: int
    group: int
    symmetric: bool

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise EdgeqError(f"expected int-group bits 4 or 8, got {self.bits}")
        if self.group not in (32, 64, 128):
            raise EdgeqError(f"expected int-group size 32, 64 or 128, got {self.group}")

    @property
    def name(self) -> str:
        return f"int{self.bits}_g{self.group}_{'sym' if self.symmetric else 'asym'}"

    @property
    def default_zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def __str__(self) -> str:
        return self.name


_NAME_RE = re.compile(r"int(\d+)_g(\d+)_(sym|asym)")


def parse_int_format(name: str | IntGroupFormat) -> IntGroupFormat:
    """``"int4_g32_sym"`` -> IntGroupFormat(4, 32, True) (case-insensitive)."""
    if isinstance(name, IntGroupFormat):
        return name
    m = _NAME_RE.fullmatch(str(name).strip().lower())
    if not m:
        raise EdgeqError(f"expected an int-group format like int4_g32_sym or int8_g128_asym, got {name!r}")
    return IntGroupFormat(int(m.group(1)), int(m.group(2)), m.group(3) == "sym")


class IntGroupCodec(Codec):
    """Codec-interface view of one group (block = group).

    ``pack`` lays a group out as fp16 scale, one zero-point byte (asymmetric only), then the
    codes packed like a MatMulNBits blob (4-bit: two per byte, low nibble first).  The tensor
    container for exporters is :class:`IntGroupTensor`.
    """

    def __init__(self, fmt: IntGroupFormat):
        self.fmt = fmt
        self.qtype = None
        self.block = fmt.group
        self.qmin, self.qmax = 0, (1 << fmt.bits) - 1
        self.zero_code = fmt.default_zero_point
        self.type_size = 2 + (0 if fmt.symmetric else 1) + fmt.group * fmt.bits // 8

    @property
    def name(self) -> str:
        return self.fmt.name

    def _params(self, x: np.ndarray, shrink: float) -> Params:
        fmt = self.fmt
        if fmt.symmetric:
            return Params(d=f16_finite(first_absmax(x).astype(np.float64) * shrink / -fmt.default_zero_point))
        lo = np.minimum(x.min(axis=1), 0.0).astype(np.float64) * shrink
        hi = np.maximum(x.max(axis=1), 0.0).astype(np.float64) * shrink
        d = f16_finite((hi - lo) / self.qmax)
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.where(d > 0, np.rint(-lo / d), 0.0)
        return Params(d=d, zp=np.clip(zp, 0, self.qmax).astype(np.uint8))

    def fit(self, x, weight=None):
        x = self._blocks(x)
        p = self._params(x, 1.0)
        if weight is None:
            return p
        w = importance_weights(weight, x.shape)
        cols = np.arange(self.block)
        x64 = x.astype(np.float64)

        def err(pp):
            r = self.decode(pp, self.encode(pp, x, cols), cols) - x64
            return (w * r * r).sum(axis=1)

        best_e = err(p)
        for s in _SHRINK[1:]:
            c = self._params(x, s)
            e = err(c)
            ok = e < best_e
            best_e = np.where(ok, e, best_e)
            p = Params(d=np.where(ok, c.d, p.d), zp=None if p.zp is None else np.where(ok, c.zp, p.zp))
        return p

    def encode(self, p, x, cols):
        """Nearest codes (R, n) int16, the lower code on an exact tie: the same codes as the
        generic candidate search :meth:`Codec.encode` (tested against it), computed directly."""
        x = np.asarray(x, _F32)
        cols = self._cols(cols)
        if x.ndim != 2 or x.shape != (len(p), cols.size):
            raise EdgeqError(f"expected x of shape ({len(p)}, {cols.size}), got {x.shape}")
        return nearest_codes(x, p.d, self.fmt.default_zero_point if p.zp is None else p.zp,
                             self.qmax, self.zero_code, np.int16)

    def _zp(self, p: Params):
        return np.int16(self.fmt.default_zero_point) if p.zp is None else p.zp.astype(np.int16)[:, None]

    def decode(self, p, q, cols):
        return p.d[:, None] * (np.asarray(q).astype(np.int16) - self._zp(p)).astype(_F32)

    def _affine(self, p, cols):
        d = p.d.astype(np.float64)[:, None]
        return d, -d * self._zp(p)

    def pack(self, p, q):
        q = self._check_codes(q, len(p)).astype(np.uint8)
        parts = [f16_bytes(p.d)]
        if not self.fmt.symmetric:
            parts.append(p.zp.astype(np.uint8)[:, None])
        parts.append(_pack_codes(q, self.fmt.bits))
        return np.concatenate(parts, axis=1)

    def unpack(self, data):
        b = self._data(data)
        off = 2 if self.fmt.symmetric else 3
        zp = None if self.fmt.symmetric else b[:, 2].copy()
        q = _unpack_codes(b[:, off:], self.fmt.bits, self.block)
        return Params(d=f16_from(b[:, :2]), zp=zp), q.astype(np.int16)


_TAU = np.float32(2.0 ** -10)  # float32 results this close to a rounding boundary are redone in float64


def nearest_codes(x: np.ndarray, d: np.ndarray, zp, qmax: int, zero_code: int, dtype=np.uint8) -> np.ndarray:
    """Codes in ``[0, qmax]`` nearest to ``x`` (R, n) float32 under ``value = d * (q - zp)``
    (``d`` (R,) fp16 values, ``zp`` an int or (R,) codes), the lower code on an exact tie;
    ``zero_code`` where ``d`` is 0 or ``x`` is not finite.

    Why this is exact: ``d * (q - zp)`` is exact in float32 (an 11-bit fp16 significand times an
    integer of at most 9 bits), so the nearest code is ``ceil(x / d + zp - 1/2)`` (halves go
    down), clipped. A value that is not a tie lies at least ~2**-25 (in steps) from the half: in
    float64 (:func:`_nearest_codes64`) the quotient can only land on a half when it is one. The
    bulk is computed in float32 (error < 2**-14 steps for in-range values), and every value within
    2**-10 steps of a rounding boundary, or not finite, is redone in float64."""
    t = np.empty(x.shape, np.float32)
    d32 = np.asarray(d, np.float32).reshape(-1, 1)
    zp = np.asarray(zp)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.divide(x, d32, out=t)
        t += (zp.astype(np.float32).reshape(-1, 1) if zp.ndim else np.float32(zp)) - np.float32(0.5)
        c = np.ceil(t)
        np.subtract(c, t, out=t)  # in [0, 1): distance below the next integer
        t -= np.float32(0.5)
        np.abs(t, out=t)
        redo = ~(t <= np.float32(0.5) - _TAU)  # near a boundary, or nan / inf
    del t
    rows, cols = np.nonzero(redo)
    if rows.size:
        zr = zp if not zp.ndim else zp.reshape(-1)[rows]
        c[rows, cols] = _nearest_codes64(x[rows, cols], np.asarray(d).reshape(-1)[rows], zr, qmax, zero_code)
    np.clip(c, 0, qmax, out=c)
    return c.astype(dtype)


def _nearest_codes64(x, d, zp, qmax: int, zero_code: int) -> np.ndarray:
    """:func:`nearest_codes` elementwise in float64 (``x``, ``d``, ``zp`` broadcast together)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.asarray(x, np.float64) / np.asarray(d, np.float64) + (np.asarray(zp, np.float64) - 0.5)
    flat = ~np.isfinite(t)
    t = np.clip(np.ceil(t), 0, qmax)
    t[flat] = zero_code
    return t


def _pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) codes -> (..., n * bits / 8) uint8; 4-bit: byte i = q[2i] | q[2i+1] << 4."""
    q = q.astype(np.uint8)
    if bits == 8:
        return q
    return q[..., 0::2] | (q[..., 1::2] << np.uint8(4))


def _unpack_codes(b: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return b.astype(np.uint8)
    out = np.empty(b.shape[:-1] + (n,), np.uint8)
    out[..., 0::2] = b & np.uint8(15)
    out[..., 1::2] = b >> np.uint8(4)
    return out


_CODECS: dict[IntGroupFormat, IntGroupCodec] = {}


def int_codec(fmt: IntGroupFormat | str) -> IntGroupCodec:
    fmt = parse_int_format(fmt)
    if fmt not in _CODECS:
        _CODECS[fmt] = IntGroupCodec(fmt)
    return _CODECS[fmt]


def storage_codec(name: str, group: int | None = None) -> Codec:
    """The block codec of a storage type (edgeq.quant.storage): a GGML type's own codec, or the
    int-group codec at ``group`` (the target's quant_block_size) for INT4 / INT8."""
    t = storage.get(name)
    if t.codec == "int-group":
        return int_codec(t.codec_name(group))
    return codec_for(t.name)


@dataclass(frozen=True, eq=False)
class IntGroupTensor:
    """A group-quantized (N, K) weight: codes (N, K) uint8, scales / zero points (N, K / group)."""

    fmt: IntGroupFormat
    shape: tuple[int, int]
    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None

    def __post_init__(self):
        fmt = parse_int_format(self.fmt)
        object.__setattr__(self, "fmt", fmt)
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 2 or shape[1] % fmt.group or min(shape) <= 0:
            raise EdgeqError(f"{fmt.name}: expected a shape (N, K) with K a multiple of {fmt.group}, got {shape}")
        object.__setattr__(self, "shape", shape)
        n, k = shape
        nb = k // fmt.group
        if self.codes.shape != shape or self.scales.shape != (n, nb):
            raise EdgeqError(f"{fmt.name}: expected codes {shape} and scales {(n, nb)}, "
                             f"got {self.codes.shape} and {self.scales.shape}")
        if self.codes.size and int(self.codes.max()) >= 1 << fmt.bits:
            raise EdgeqError(f"{fmt.name}: codes outside [0, {(1 << fmt.bits) - 1}]")
        if fmt.symmetric != (self.zero_points is None):
            raise EdgeqError(f"{fmt.name}: zero points must be given exactly for asymmetric formats")
        if self.zero_points is not None and self.zero_points.shape != (n, nb):
            raise EdgeqError(f"{fmt.name}: expected zero points {(n, nb)}, got {self.zero_points.shape}")

    @property
    def n_blocks(self) -> int:
        return self.shape[1] // self.fmt.group

    @property
    def nbytes(self) -> int:
        """Packed size: codes, fp16 scales, and zero points packed ``bits`` wide per output row."""
        n, k = self.shape
        total = n * k * self.fmt.bits // 8 + 2 * n * self.n_blocks
        if self.zero_points is not None:
            total += n * (-(-self.n_blocks * self.fmt.bits // 8))
        return total

    def dequantize(self) -> np.ndarray:
        n, k = self.shape
        g = self.fmt.group
        zp = self.fmt.default_zero_point if self.zero_points is None else self.zero_points.astype(np.int16)[..., None]
        q = self.codes.reshape(n, -1, g).astype(np.int16) - np.asarray(zp, np.int16)
        return (self.scales.astype(_F32)[..., None] * q.astype(_F32)).reshape(n, k)

    def matmulnbits_attributes(self) -> dict[str, int]:
        n, k = self.shape
        return {"K": k, "N": n, "bits": self.fmt.bits, "block_size": self.fmt.group}

    def to_matmulnbits(self) -> dict[str, np.ndarray]:
        """Initializers for ``com.microsoft.MatMulNBits`` (attributes: ``matmulnbits_attributes``).

        ``B``: uint8 (N, n_blocks, group * bits / 8), codes packed along K low bits first;
        ``scales``: float32 (N * n_blocks,); ``zero_points`` (asymmetric only): uint8
        (N * ceil(n_blocks * bits / 8),), packed like ``B`` per output row.  Without
        ``zero_points`` MatMulNBits uses 2**(bits-1), our symmetric zero point.  (The current
        contrib-op doc gives scales / zero points as (N, ...) 2-D; onnxruntime 1.32 accepts the
        flat and the 2-D shapes alike: reshape if an exporter wants the latter.)
        """
        n, _ = self.shape
        nb, g = self.n_blocks, self.fmt.group
        out = {
            "B": np.ascontiguousarray(_pack_codes(self.codes.reshape(n, nb, g), self.fmt.bits)),
            "scales": np.ascontiguousarray(self.scales, _F32).reshape(-1),
        }
        if self.zero_points is not None:
            zp = self.zero_points.astype(np.uint8)
            if self.fmt.bits == 4 and nb % 2:
                zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
            out["zero_points"] = np.ascontiguousarray(_pack_codes(zp, self.fmt.bits)).reshape(-1)
        return out

    @classmethod
    def from_blocks(cls, fmt: IntGroupFormat | str, shape, p: Params, q: np.ndarray) -> "IntGroupTensor":
        """Assemble from codec output over the (N * K / group) groups in row-major order."""
        fmt = parse_int_format(fmt)
        n, k = (int(s) for s in shape)
        if k % fmt.group:
            raise EdgeqError(f"{fmt.name}: expected K a multiple of {fmt.group}, got {k}")
        nb = k // fmt.group
        zp = None if fmt.symmetric else np.asarray(p.zp, np.uint8).reshape(n, nb)
        return cls(fmt, (n, k), np.asarray(q).astype(np.uint8).reshape(n, k),
                   np.asarray(p.d, _F32).reshape(n, nb), zp)


def rtn_int(x: np.ndarray, fmt: IntGroupFormat | str) -> IntGroupTensor:
    """Round-to-nearest group quantization of ``x`` (N, K) (K a multiple of the group size)."""
    fmt = parse_int_format(fmt)
    x = np.asarray(x, _F32)
    if x.ndim != 2:
        raise EdgeqError(f"{fmt.name}: expected a 2-D (N, K) weight, got shape {x.shape}")
    n, k = x.shape
    if k % fmt.group:
        raise EdgeqError(f"{fmt.name}: expected K a multiple of {fmt.group}, got {k}")
    p, q = int_codec(fmt).rtn(x.reshape(-1, fmt.group))
    return IntGroupTensor.from_blocks(fmt, (n, k), p, q)


def fit_format(fmt: str | IntGroupFormat, k: int) -> IntGroupFormat:
    """The int-group format for a tensor with ``k`` inputs: the requested group, or the largest
    of 128/64/32 that divides ``k`` and is not larger (noted in the manifest)."""
    f = parse_int_format(fmt)
    for g in (128, 64, 32):
        if g <= f.group and k % g == 0:
            return IntGroupFormat(f.bits, g, f.symmetric)
    raise EdgeqError(f"{f.name}: no group size of 32/64/128 divides the input width {k}")


def dequantized(weight: np.ndarray, fmt_name: str | None) -> np.ndarray:
    """What a lowering computes with for a weight stored as ``fmt_name`` (float32 for None):
    round to nearest in the format fitted to its input width, then decode."""
    if fmt_name is None:
        return weight
    return rtn_int(weight, fit_format(fmt_name, weight.shape[1])).dequantize()
