"""Hardware target profiles: one TOML per device in the repository's ``targets/`` directory.

A profile says what the planner and the lowerings need to know about a device: the memory budget
for weights + KV cache, memory bandwidth, peak throughput per dtype, ISA features, the TVM compile
target, which artifact formats and quant types run well there, and the block sizes that pruning
and quantisation must respect.

File layout (every section and key below is required unless marked optional)::

    name = "gpu-t4"                      # must equal the file name without ".toml"
    description = "..."
    kind = "gpu"                         # cpu | gpu | mobile
    reference_device = "NVIDIA Tesla T4" # optional

    [memory]
    total_gib = 16                       # or total_bytes
    budget_gib = 14                      # or budget_bytes; weights + KV cache
    bandwidth_gb_s = 320

    [peak]                               # dense peak; fp32 required, the rest optional
    fp32_tflops = 8.1
    fp16_tflops = 65
    int8_tops = 130
    int4_tops = 260

    [isa]
    features = ["sm_75", "tensor_cores"]

    [compile]
    tvm_target = { kind = "cuda", arch = "sm_75" }      # or kind="llvm", mtriple, mcpu, mattr

    [deploy]
    formats = ["onnx", "gguf", "tvm"]    # ordered, best first
    quant_types = ["INT4", "Q4_0"]       # storage types (edgeq.quant.storage), ordered, best first
    default_bits = 4
    quant_block_size = 128
    prune_granularity = 128              # multiple of quant_block_size and of each type's block
    threads = 8                          # cpu/mobile only
    tvm_activations = "float32"          # optional: float32 | int8 (tvm kernels' integer dot products)

Profiles are looked up by name in ``targets/`` next to the ``edgeq`` package, or in the
directory named by ``$EDGEQ_TARGETS_DIR``; a path to a ``.toml`` file works too.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from edgeq.backends import target_formats
from edgeq.errors import EdgeqError
from edgeq.kernels.spec import ACTS
from edgeq.quant import storage
from edgeq.quant.formats import QType
# (private aliases: parse_target below reads as before the schema moved out)
from edgeq.targets_schema import GIB
from edgeq.targets_schema import Reader as _Reader
from edgeq.targets_schema import enum_value as _enum
from edgeq.targets_schema import show as _show

ENV_TARGETS_DIR = "EDGEQ_TARGETS_DIR"


class DeviceKind(str, Enum):
    CPU = "cpu"
    GPU = "gpu"
    MOBILE = "mobile"


# The formats a profile may list in ``deploy.formats``: every registered backend that is not
# built for all targets alike (``reference``), e.g. ArtifactFormat.GGUF == "gguf".
ArtifactFormat = Enum("ArtifactFormat", [(n.upper(), n) for n in target_formats()], type=str, module=__name__)


# Quant types a profile may name (the storage-type registry, edgeq.quant.storage) -> the block
# (weights per scale, along the input axis) the type itself imposes. ``None``: the block is the
# profile's ``quant_block_size`` (the blockwise integer grid of ONNX MatMulNBits and generated TVM
# kernels). A view of the registry, kept for readers of this module.
QUANT_TYPE_BLOCK: dict[str, int | None] = {t.name: t.block_size for t in storage.types()}

# ``deploy.default_bits``: what some backend's --bits takes.
ALLOWED_BITS = storage.bits_choices()
_CUDA_ARCH = re.compile(r"^sm_\d{2,3}[a-z]?$")


@dataclass(frozen=True)
class CompileTarget:
    """The TVM target for a profile: ``kind="llvm"`` (mtriple, mcpu, mattr) or ``kind="cuda"`` (arch)."""

    kind: str
    mtriple: str | None = None
    mcpu: str | None = None
    mattr: tuple[str, ...] = ()
    arch: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A TVM target config dict, e.g. ``{"kind": "llvm", "mtriple": ..., "mcpu": "haswell"}``."""
        d: dict[str, Any] = {"kind": self.kind}
        if self.mtriple is not None:
            d["mtriple"] = self.mtriple
        if self.mcpu is not None:
            d["mcpu"] = self.mcpu
        if self.mattr:
            d["mattr"] = list(self.mattr)
        if self.arch is not None:
            d["arch"] = self.arch
        return d

    def as_str(self) -> str:
        """The same target as a TVM target string, e.g. ``"llvm -mtriple=... -mcpu=haswell"``."""
        parts = [self.kind]
        if self.mtriple is not None:
            parts.append(f"-mtriple={self.mtriple}")
        if self.mcpu is not None:
            parts.append(f"-mcpu={self.mcpu}")
        if self.mattr:
            parts.append("-mattr=" + ",".join(self.mattr))
        if self.arch is not None:
            parts.append(f"-arch={self.arch}")
        return " ".join(parts)


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    kind: DeviceKind
    reference_device: str | None
    memory_total_bytes: int
    memory_budget_bytes: int  # weights + KV cache
    bandwidth_gb_s: float  # GB/s, 1e9 bytes per second
    peak_fp32_tflops: float
    peak_fp16_tflops: float | None
    peak_int8_tops: float | None
    peak_int4_tops: float | None
    isa_features: tuple[str, ...]
    compile_target: CompileTarget
    formats: tuple[ArtifactFormat, ...]  # best first
    quant_types: tuple[str, ...]  # storage-type names (edgeq.quant.storage), best first
    default_bits: int
    quant_block_size: int
    prune_granularity: int
    threads: int | None  # cpu/mobile: worker threads; None for gpu
    source: Path | None = None  # the TOML file it was loaded from
    # [plan]: defaults of the mixed-precision planner (edgeq.plan)
    plan_bpw: float | None = None  # default budget, bits per weight over the 2-D weights (branches included)
    plan_ranks: tuple[int, ...] = (0,)  # candidate error-compensation ranks
    # onnxruntime MatMulNBits accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute)
    onnx_accuracy_level: int = 4
    # the tvm kernels' activations: float32, or int8 per group with integer dot products (needs
    # AVX-512 VNNI / AVX-VNNI / AVX2 / aarch64 dotprod in isa.features; edgeq.kernels.tir_dot)
    tvm_activations: str = "float32"

    def plan_types(self, fmt: str = "gguf") -> tuple[str, ...]:
        """Candidate storage types for the planner in artifact format ``fmt``: the profile's types
        that the ``fmt`` backend can store (the registry's ``backends``), best first."""
        return tuple(t for t in self.quant_types if storage.get(t).stored_by(fmt))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["kind"] = self.kind.value
        d["formats"] = [f.value for f in self.formats]
        d["compile_target"] = self.compile_target.as_dict()
        d["source"] = str(self.source) if self.source else None
        return d

    @property
    def memory_budget_gib(self) -> float:
        return self.memory_budget_bytes / GIB

    @property
    def memory_total_gib(self) -> float:
        return self.memory_total_bytes / GIB

    def has_feature(self, feature: str) -> bool:
        return feature in self.isa_features

    def supports_format(self, fmt: ArtifactFormat | str) -> bool:
        return ArtifactFormat(fmt) in self.formats

    def peak(self, dtype: str) -> float | None:
        """Dense peak for ``fp32`` / ``fp16`` (TFLOPS) or ``int8`` / ``int4`` (TOPS); None if not given."""
        table = {
            "fp32": self.peak_fp32_tflops,
            "fp16": self.peak_fp16_tflops,
            "int8": self.peak_int8_tops,
            "int4": self.peak_int4_tops,
        }
        if dtype not in table:
            raise EdgeqError(f"unknown dtype {dtype!r}; expected one of: {', '.join(table)}")
        return table[dtype]

    def block_for(self, quant_type: str) -> int:
        """Weights per scale for a quant type on this target."""
        t = storage.find(quant_type)
        if t is None or t.name != quant_type:
            raise EdgeqError(f"unknown quant type {quant_type!r}; known: {', '.join(storage.names())}")
        return t.block_for(self.quant_block_size)


# --------------------------------------------------------------------------------------------
# Lookup


def targets_dir() -> Path:
    """Where profiles are looked up by name: ``$EDGEQ_TARGETS_DIR`` or the repository's ``targets/``."""
    env = os.environ.get(ENV_TARGETS_DIR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "targets"


def _profile_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise EdgeqError(f"targets directory not found: {directory}")
    return sorted(directory.glob("*.toml"))


def _looks_like_path(name_or_path: str | os.PathLike) -> bool:
    if isinstance(name_or_path, Path):
        return True
    s = os.fspath(name_or_path)
    return s.endswith(".toml") or "/" in s or os.sep in s


def load_target(name_or_path: str | os.PathLike) -> TargetProfile:
    """Load and validate a profile by name (``"gpu-t4"``) or by path to a ``.toml`` file."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise EdgeqError(f"target file not found: {path}")
        return _load_file(path)
    name = os.fspath(name_or_path)
    directory = targets_dir()
    files = _profile_files(directory)
    for f in files:
        if f.stem == name:
            return _load_file(f)
    known = ", ".join(f.stem for f in files) or "(none)"
    raise EdgeqError(f"unknown target {name!r}; known: {known}")


def list_targets() -> list[TargetProfile]:
    """Every profile in the targets directory, validated, sorted by name."""
    profiles = [_load_file(f) for f in _profile_files(targets_dir())]
    return sorted(profiles, key=lambda p: p.name)


# --------------------------------------------------------------------------------------------
# Parsing and validation (the schema and the typed reader: edgeq/targets_schema.py)


def _load_file(path: Path) -> TargetProfile:
    where = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise EdgeqError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise EdgeqError(f"{where}: invalid TOML: {exc}") from exc
    profile = parse_target(data, where=where, source=path)
    if profile.name != path.stem:
        raise EdgeqError(f"{where}: name {profile.name!r} does not match the file name {path.stem!r}")
    return profile


def parse_target(data: Mapping[str, Any], where: str = "<target>", source: Path | None = None) -> TargetProfile:
    """Build and validate a profile from parsed TOML data; errors name ``where`` and the field."""
    top = _Reader(where, data)
    name = top.string("name")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise top.error(f"'name' must be lower-case letters, digits, '.', '_' or '-', got {name!r}")
    description = top.string("description")
    kind = _enum(top, "kind", DeviceKind, top.string("kind"))
    reference_device = top.string("reference_device", required=False)

    mem = top.sub("memory")
    total = mem.bytes_("total")
    budget = mem.bytes_("budget")
    if budget > total:
        raise mem.error(f"memory budget {budget / GIB:g} GiB exceeds total memory {total / GIB:g} GiB")
    bandwidth = mem.number("bandwidth_gb_s")

    peak = top.sub("peak")
    fp32 = peak.number("fp32_tflops")
    fp16 = peak.number("fp16_tflops", required=False)
    int8 = peak.number("int8_tops", required=False)
    int4 = peak.number("int4_tops", required=False)

    isa = top.sub("isa")
    features = isa.strings("features")

    comp = top.sub("compile")
    compile_target = _compile_target(comp.sub("tvm_target"), kind)
    if kind is DeviceKind.GPU and compile_target.arch not in features:
        raise isa.error(f"'isa.features' must include the CUDA arch {compile_target.arch!r}")

    dep = top.sub("deploy")
    formats = tuple(_enum(dep, "formats", ArtifactFormat, f) for f in dep.strings("formats"))
    quant_types = dep.strings("quant_types")
    for q in quant_types:
        t = storage.find(q)
        if t is None or t.name != q:
            raise dep.error(f"unknown quant type {q!r} in 'deploy.quant_types'; known: {', '.join(storage.names())}")
        if not any(t.stored_by(f.value) for f in formats):
            raise dep.error(f"quant type {q!r} in 'deploy.quant_types' is stored by none of the target's formats "
                            f"({', '.join(f.value for f in formats)}; {q}: {', '.join(sorted(t.backends))})")
    default_bits = dep.integer("default_bits")
    if default_bits not in ALLOWED_BITS:
        raise dep.error(f"'deploy.default_bits' must be one of {', '.join(map(str, ALLOWED_BITS))}, got {default_bits}")
    block = dep.integer("quant_block_size")
    gran = dep.integer("prune_granularity")
    if gran % block:
        raise dep.error(f"prune_granularity {gran} is not a multiple of quant_block_size {block}")
    for q in quant_types:
        qb = storage.get(q).block_size
        # K-quant super-blocks (256) are exempt: the planner only gives them to tensors whose
        # widths are multiples of 256, as llama.cpp falls back for the others.
        if qb is not None and qb < 256 and gran % qb:
            raise dep.error(f"prune_granularity {gran} is not a multiple of the {q} block size {qb}")
    threads = dep.integer("threads", required=False)
    if kind is DeviceKind.GPU:
        if threads is not None:
            raise dep.error("'deploy.threads' is for cpu/mobile targets; remove it from a gpu target")
    elif threads is None:
        raise dep.error(f"missing field 'deploy.threads' (required for a {kind.value} target)")

    acc = dep.raw("onnx_accuracy_level", required=False)
    if acc is not None and (isinstance(acc, bool) or acc not in (0, 1, 2, 3, 4)):
        raise dep.error(f"'deploy.onnx_accuracy_level' must be 0..4 (MatMulNBits accuracy_level), got {acc}")

    tvm_act = dep.string("tvm_activations", required=False) or "float32"
    if tvm_act not in ACTS:
        raise dep.error(f"'deploy.tvm_activations' must be float32 or int8, got {tvm_act!r}")
    if tvm_act == "int8" and not set(features) & {"avx512vnni", "avxvnni", "avx2", "dotprod"}:
        raise dep.error("'deploy.tvm_activations' int8 needs an integer dot instruction in 'isa.features' "
                        "(avx512vnni, avxvnni, avx2 or dotprod)")

    plan_bpw, plan_ranks = None, (0,)
    if "plan" in data:
        pl = top.sub("plan")
        plan_bpw = pl.number("default_bpw", required=False)
        ranks = pl.raw("ranks", required=False)
        if ranks is not None:
            if (not isinstance(ranks, list) or not ranks
                    or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)):
                raise pl.error(f"'plan.ranks' must be a non-empty list of integers >= 0, got {_show(ranks)}")
            plan_ranks = tuple(sorted(set(ranks) | {0}))

    return TargetProfile(
        name=name,
        description=description,
        kind=kind,
        reference_device=reference_device,
        memory_total_bytes=total,
        memory_budget_bytes=budget,
        bandwidth_gb_s=bandwidth,
        peak_fp32_tflops=fp32,
        peak_fp16_tflops=fp16,
        peak_int8_tops=int8,
        peak_int4_tops=int4,
        isa_features=features,
        compile_target=compile_target,
        formats=formats,
        quant_types=quant_types,
        default_bits=default_bits,
        quant_block_size=block,
        prune_granularity=gran,
        threads=threads,
        source=source,
        plan_bpw=plan_bpw,
        plan_ranks=plan_ranks,
        onnx_accuracy_level=4 if acc is None else acc,
        tvm_activations=tvm_act,
    )


def _compile_target(r: _Reader, kind: DeviceKind) -> CompileTarget:
    tkind = r.string("kind")
    if tkind == "llvm":
        if kind is DeviceKind.GPU:
            raise r.error("a gpu target needs compile.tvm_target.kind = \"cuda\", got \"llvm\"")
        if r.raw("arch", required=False) is not None:
            raise r.error("'compile.tvm_target.arch' is for cuda targets; use mcpu for llvm")
        return CompileTarget(
            kind="llvm",
            mtriple=r.string("mtriple"),
            mcpu=r.string("mcpu"),
            mattr=r.strings("mattr", required=False),
        )
    if tkind == "cuda":
        if kind is not DeviceKind.GPU:
            raise r.error(f"a {kind.value} target needs compile.tvm_target.kind = \"llvm\", got \"cuda\"")
        for k in ("mtriple", "mcpu", "mattr"):
            if r.raw(k, required=False) is not None:
                raise r.error(f"'compile.tvm_target.{k}' is for llvm targets; use arch for cuda")
        arch = r.string("arch")
        if not _CUDA_ARCH.match(arch):
            raise r.error(f"'compile.tvm_target.arch' must look like sm_75, got {arch!r}")
        return CompileTarget(kind="cuda", arch=arch)
    raise r.error(f"'compile.tvm_target.kind' must be one of llvm, cuda, got {tkind!r}")
