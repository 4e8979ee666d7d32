"""The storage-type registry: every way edgeq can store a weight, each registered once.

One :class:`StorageType` per type, in the spirit of gguf-py's ``quants.py`` (one entry per type,
sizes from one table): its block size and bytes per block (so bits per weight), the GGML type id
where it is a GGML type, the codec that fits / encodes / packs it, the backends that can store it
and a speed class. Targets (``deploy.quant_types``), the planner (``edgeq.plan``), every backend's
option validation and the GGUF writer read this table; nothing else lists storage types.

* GGML types (``F32`` ... ``Q6_K``) keep ggml's ids and byte layouts (:mod:`edgeq.quant.formats`
  is their GGML view: ``QType`` / ``FORMATS`` are derived from this table).
* ``INT4`` / ``INT8`` are the blockwise integer grids of ONNX ``MatMulNBits`` and the generated
  TVM kernels: the block (group) is the target profile's ``quant_block_size``, and at group ``g``
  the type is the int-group format ``int{bits}_g{g}_sym`` (:mod:`edgeq.quant.intgroup`).

``--bits N`` picks, for a backend, the ``uniform`` type of ``N`` bits that the backend stores
(:func:`for_bits`): gguf 4 -> Q4_0, 8 -> Q8_0, 16 -> F16, 32 -> F32; onnx 4 -> INT4, 8 -> INT8,
32 -> F32; tvm 4 -> INT4, 8 -> INT8; reference 32 -> F32.

Speed classes, the decode cost per weight on the runtimes that run the type (relative, CPU):
``fast`` (simple blocks with integer dot-product kernels), ``medium`` (extra unpacking: block
minimums, 5th bits, K-quant sub-block scales), ``slow`` (float weights: bandwidth-bound).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from edgeq.errors import EdgeqError

CODECS = ("float", "ggml", "int-group")  # float: stored as is; ggml: edgeq.quant.codecs; int-group: intgroup
SPEED_CLASSES = ("fast", "medium", "slow")
BACKENDS = ("gguf", "onnx", "tvm", "reference")  # every backend a type may name


@dataclass(frozen=True)
class StorageType:
    name: str  # "Q4_0", "INT4": what plans, target profiles and manifests call it
    bits: int  # nominal bits per stored value (scales / minimums not counted)
    block_size: int | None  # values per block (scale); None: the target's quant_block_size
    type_size: int | None  # bytes per block; None: from the block (int groups, see block_bytes)
    backends: frozenset[str]  # backends that can store it
    speed: str  # one of SPEED_CLASSES
    codec: str  # one of CODECS
    ggml_type_id: int | None = None  # enum ggml_type, as stored in a GGUF tensor header
    uniform: bool = False  # what --bits <bits> means for the backends that store it
    layout: str = ""  # the byte layout of one block, for readers

    def __post_init__(self):
        if self.speed not in SPEED_CLASSES:
            raise EdgeqError(f"storage type {self.name}: speed class must be one of {SPEED_CLASSES}, got {self.speed!r}")
        if self.codec not in CODECS:
            raise EdgeqError(f"storage type {self.name}: codec must be one of {CODECS}, got {self.codec!r}")
        unknown = sorted(set(self.backends) - set(BACKENDS))
        if not self.backends or unknown:
            raise EdgeqError(f"storage type {self.name}: backends must be a non-empty subset of {BACKENDS}, "
                             f"got {sorted(self.backends)}")
        if (self.block_size is None) != (self.type_size is None):
            raise EdgeqError(f"storage type {self.name}: give block_size and type_size together")

    @property
    def is_ggml(self) -> bool:
        return self.ggml_type_id is not None

    @property
    def quantized(self) -> bool:
        return self.codec != "float"

    def stored_by(self, backend: str) -> bool:
        return backend in self.backends

    def block_for(self, group: int | None = None) -> int:
        """Values per block: the type's own, or ``group`` (the target's quant_block_size) for int groups."""
        if self.block_size is not None:
            return self.block_size
        if group is None:
            raise EdgeqError(f"{self.name}: the block size is the target's quant_block_size; give it")
        return int(group)

    def block_bytes(self, group: int | None = None) -> int:
        """Bytes per block; an int group stores an fp16 scale and ``group * bits / 8`` bytes of codes."""
        if self.type_size is not None:
            return self.type_size
        g = self.block_for(group)
        return 2 + g * self.bits // 8

    def bits_per_weight(self, group: int | None = None) -> float:
        """Storage cost including scales, e.g. 4.5 for Q4_0 (and for INT4 at group 32)."""
        return self.block_bytes(group) * 8 / self.block_for(group)

    def nbytes(self, shape, group: int | None = None) -> int:
        """Bytes of a tensor of ``shape`` (rows along the last dimension, a multiple of the block)."""
        shape = tuple(int(x) for x in shape)
        block = self.block_for(group)
        if not shape or shape[-1] < 0 or shape[-1] % block:
            raise EdgeqError(f"{self.name}: expected a row length that is a multiple of {block}, got shape {shape}")
        rows = 1
        for x in shape[:-1]:
            rows *= x
        return rows * (shape[-1] // block) * self.block_bytes(group)

    def codec_name(self, group: int | None = None) -> str:
        """The codec's name for this type: the GGML type name, or the int-group format at ``group``
        (``INT4`` at 32 -> ``int4_g32_sym``)."""
        if self.codec == "int-group":
            return f"int{self.bits}_g{self.block_for(group)}_sym"
        return self.name


_TYPES: dict[str, StorageType] = {}


def register(t: StorageType) -> StorageType:
    """Add ``t`` under ``t.name``; a name (or a GGML type id) registered twice is an error."""
    if t.name in _TYPES:
        raise EdgeqError(f"storage type {t.name!r} is registered twice")
    if t.ggml_type_id is not None:
        clash = next((o for o in _TYPES.values() if o.ggml_type_id == t.ggml_type_id), None)
        if clash is not None:
            raise EdgeqError(f"storage type {t.name!r}: GGML type id {t.ggml_type_id} is already {clash.name!r}")
    _TYPES[t.name] = t
    return t


def unregister(name: str) -> None:
    """Remove a type (tests that register a throwaway one)."""
    _TYPES.pop(name, None)


def types() -> tuple[StorageType, ...]:
    """Every registered type, in registration order."""
    return tuple(_TYPES.values())


def names() -> tuple[str, ...]:
    return tuple(_TYPES)


def find(name: str | None) -> StorageType | None:
    return _TYPES.get(str(name).upper()) if name is not None else None


def get(name: str) -> StorageType:
    """The type called ``name`` (case-insensitive); an unknown name is an ``EdgeqError`` listing the known ones."""
    t = find(name)
    if t is None:
        raise EdgeqError(f"unknown storage type {name!r}; known: {', '.join(_TYPES)}")
    return t


def ggml_types() -> tuple[StorageType, ...]:
    return tuple(t for t in _TYPES.values() if t.is_ggml)


def for_backend(backend: str) -> tuple[StorageType, ...]:
    """The types ``backend`` can store, in registration order."""
    return tuple(t for t in _TYPES.values() if t.stored_by(backend))


def bits_choices(backend: str | None = None) -> tuple[int, ...]:
    """The ``--bits`` values ``backend`` takes (every backend's, for None), ascending."""
    return tuple(sorted({t.bits for t in _TYPES.values() if t.uniform and (backend is None or t.stored_by(backend))}))


def for_bits(backend: str, bits: int) -> StorageType:
    """The type ``--bits bits`` stores in ``backend``'s artifacts."""
    for t in _TYPES.values():
        if t.uniform and t.bits == bits and t.stored_by(backend):
            return t
    raise EdgeqError(f"the {backend} format takes --bits {or_list(bits_choices(backend))}, got {bits}")


def plannable(names_: Iterable[str], backend: str, where: str = "") -> tuple[str, ...]:
    """Candidate types for a per-tensor plan in ``backend``'s artifacts: each one the backend
    stores (:func:`check_storable`) with a block size of its own; else one ``EdgeqError``."""
    out = check_storable(names_, backend, where)
    for n in out:
        if get(n).block_size is None:
            raise EdgeqError(f"{where}{n} cannot be planned: its block is the target's quant_block_size "
                             "(the planner sizes types with a block of their own)")
    return out


def check_storable(names_: Iterable[str], backend: str, where: str = "") -> tuple[str, ...]:
    """``names_`` as registered names, each one ``backend`` can store; else one ``EdgeqError``."""
    out = []
    for n in names_:
        t = get(n)
        if not t.stored_by(backend):
            can = ", ".join(x.name for x in for_backend(backend))
            raise EdgeqError(f"{where}{t.name} cannot be stored in a {backend} artifact (it stores: {can})")
        out.append(t.name)
    return tuple(out)


def or_list(xs) -> str:
    """``(4, 8, 32)`` -> ``"4, 8 or 32"`` (for messages)."""
    xs = [str(x) for x in xs]
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " or " + xs[-1]


# ---- the table -----------------------------------------------------------------------------------
# Registration order is significant: it is QType's order (edgeq.quant.formats) and the order in
# which ties between types are broken (e.g. the GGUF base type of a plan).

_GGUF = frozenset({"gguf"})
_INT = frozenset({"onnx", "tvm"})

register(StorageType("F32", 32, 1, 4, frozenset({"gguf", "onnx", "reference"}), "slow", "float",
                     ggml_type_id=0, uniform=True, layout="float32"))
register(StorageType("F16", 16, 1, 2, _GGUF, "slow", "float", ggml_type_id=1, uniform=True, layout="float16"))
register(StorageType("Q8_0", 8, 32, 34, _GGUF, "fast", "ggml", ggml_type_id=8, uniform=True,
                     layout="block_q8_0: fp16 d; int8 qs[32]"))
register(StorageType("Q4_0", 4, 32, 18, _GGUF, "fast", "ggml", ggml_type_id=2, uniform=True,
                     layout="block_q4_0: fp16 d; uint8 qs[16] (low nibbles = values 0..15, high nibbles = 16..31)"))
register(StorageType("Q4_1", 4, 32, 20, _GGUF, "medium", "ggml", ggml_type_id=3,
                     layout="block_q4_1: fp16 d; fp16 m; uint8 qs[16]"))
register(StorageType("Q5_0", 5, 32, 22, _GGUF, "medium", "ggml", ggml_type_id=6,
                     layout="block_q5_0: fp16 d; uint32 qh (bit j = 5th bit of value j); uint8 qs[16] (nibbles as Q4_0)"))
register(StorageType("Q5_1", 5, 32, 24, _GGUF, "medium", "ggml", ggml_type_id=7,
                     layout="block_q5_1: fp16 d; fp16 m; uint32 qh; uint8 qs[16]"))
register(StorageType("Q4_K", 4, 256, 144, _GGUF, "medium", "ggml", ggml_type_id=12,
                     layout="block_q4_K: fp16 d; fp16 dmin; uint8 scales[12] (6-bit scale + 6-bit min for 8 "
                            "sub-blocks of 32); uint8 qs[128] (per 64 values: low nibbles = first 32, high = next 32)"))
register(StorageType("Q6_K", 6, 256, 210, _GGUF, "medium", "ggml", ggml_type_id=14,
                     layout="block_q6_K: uint8 ql[128] (low 4 bits); uint8 qh[64] (high 2 bits); int8 scales[16] "
                            "(sub-blocks of 16); fp16 d"))
register(StorageType("INT4", 4, None, None, _INT, "fast", "int-group", uniform=True,
                     layout="MatMulNBits: fp16-rounded scale per group; codes two per byte, low nibble first"))
register(StorageType("INT8", 8, None, None, _INT, "fast", "int-group", uniform=True,
                     layout="MatMulNBits: fp16-rounded scale per group; one code per byte"))
