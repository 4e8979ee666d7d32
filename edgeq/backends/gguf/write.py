"""ModelIR -> model GGUF (deterministic, atomic, streamed tensor by tensor)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from edgeq.artifact import atomic_write_file
from edgeq.backends.gguf.check import check
from edgeq.backends.gguf.layout import GGUF_ARCH, gguf_module, gguf_tensor_name, out_rows, tensor_shapes
from edgeq.backends.gguf.tokenizer import write_tokenizer
from edgeq.backends.gguf.types import LLAMA_FTYPE, base_type_of_plan
from edgeq.errors import EdgeqError
from edgeq.ir import Linear, ModelIR
from edgeq.quant import native
from edgeq.quant.formats import FORMATS, QType, as_qtype
from edgeq.quant.reference import dequantize, quantize


def packed_rows(ir: ModelIR, lin: Linear, qt: QType) -> np.ndarray | None:
    """The linear's grid-exact packed bytes in llama.cpp row order, when it carries them in ``qt``.

    Checks that they still decode to ``lin.weight`` exactly (lossless lowering); a stale
    packing (the weight changed since) is an error rather than a silent mismatch."""
    p = lin.packed
    if p is None or as_qtype(p.qtype) != qt:
        return None
    if not np.array_equal(dequantize(p.data, qt, lin.weight.shape), np.asarray(lin.weight, dtype=np.float32)):
        raise EdgeqError(f"GGUF: {lin.name}: packed {qt.value} data no longer decodes to the weight "
                         "(a pass changed the weight after quantization)")
    return out_rows(ir, lin, np.ascontiguousarray(p.data, dtype=np.uint8))


class _Raw:
    """Already-encoded GGML bytes for ``write_tensors`` (``array_of`` may return one)."""

    def __init__(self, data: np.ndarray, qt: QType):
        self.data, self.qt = data, qt


def _encode(arr: np.ndarray, qt: QType) -> tuple[np.ndarray, Any]:
    """(array to write, raw ggml type or None)."""
    gguf = gguf_module()
    if isinstance(arr, _Raw):
        return np.ascontiguousarray(arr.data, dtype=np.uint8), gguf.GGMLQuantizationType[arr.qt.value]
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qt == QType.F32:
        return arr, None
    if qt == QType.F16:
        return arr.astype(np.float16), None
    if native.available() and qt in native.NATIVE_TYPES and arr.ndim == 2:
        data = native.quantize(arr, qt)  # ggml's own encoder: same bytes, faster (edgeq.quant.native)
    else:
        data = np.ascontiguousarray(quantize(arr, qt), dtype=np.uint8)
    return data, gguf.GGMLQuantizationType[qt.value]


def _add_kv(w, key: str, val: Any) -> None:
    gguf = gguf_module()
    VT = gguf.GGUFValueType
    if isinstance(val, bool):
        w.add_bool(key, val)
    elif isinstance(val, (int, np.integer)):
        v = int(val)
        if 0 <= v < 2 ** 32:
            w.add_uint32(key, v)
        else:
            w.add_int64(key, v)
    elif isinstance(val, (float, np.floating)):
        w.add_float32(key, float(val))
    elif isinstance(val, str):
        w.add_key_value(key, val, VT.STRING)  # add_string drops empty strings
    elif isinstance(val, (list, tuple)):
        if not val:
            raise EdgeqError(f"GGUF: extra_kv {key!r}: empty arrays cannot be written")
        w.add_array(key, list(val))
    else:
        raise EdgeqError(f"GGUF: extra_kv {key!r}: expected bool/int/float/str/list, got {type(val).__name__}")


def model_name(ir: ModelIR) -> str:
    src = ir.source or {}
    name = src.get("name") or (Path(str(src["path"])).name if src.get("path") else None)
    return str(name or "edgeq-model")



def write_model_header(w, ir: ModelIR, base: QType, extra_kv: Mapping[str, Any] | None,
                       ffn: int | list[int] | None = None) -> None:
    """Model metadata: hparams, file type, tokenizer, then ``extra_kv`` (sorted; may not shadow
    ours). ``ffn``: a per-layer list for ``deci``; default the IR's intermediate size."""
    gguf = gguf_module()
    hp = ir.hparams
    w.add_type("model")
    w.add_name(model_name(ir))
    w.add_context_length(int(hp.max_position_embeddings))
    w.add_embedding_length(int(hp.hidden_size))
    w.add_block_count(int(hp.num_layers))
    w.add_feed_forward_length(int(hp.intermediate_size) if ffn is None else ffn)
    w.add_head_count(int(hp.num_heads))
    w.add_head_count_kv(int(hp.num_kv_heads))
    w.add_rope_freq_base(float(hp.rope_theta))
    w.add_layer_norm_rms_eps(float(hp.rms_norm_eps))
    w.add_vocab_size(int(hp.vocab_size))
    w.add_rope_dimension_count(int(hp.head_dim))
    if hp.head_dim != hp.hidden_size // hp.num_heads:
        w.add_key_length(int(hp.head_dim))
        w.add_value_length(int(hp.head_dim))
    if hp.sliding_window is not None:  # the layer pattern and local RoPE base are llama.cpp's own
        w.add_sliding_window(int(hp.sliding_window))
    w.add_file_type(LLAMA_FTYPE[base])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(w, ir.tokenizer, hp.vocab_size)
    ours = set(w.kv_data[0])
    for key in sorted(extra_kv or {}):
        if key in ours:
            raise EdgeqError(f"GGUF: extra_kv may not override {key!r}")
        _add_kv(w, key, extra_kv[key])


def fixed_overhead_bytes(ir: ModelIR) -> int:
    """Bytes of a model GGUF that do not depend on the 2-D weights' types: header, metadata,
    tokenizer, the F32 1-D tensors, and per-tensor index entries + alignment (estimated at
    96 bytes per 2-D tensor). Used to turn a total-size budget into a weight budget."""
    gguf = gguf_module()
    shapes = tensor_shapes(ir)
    one_d = [n for n, s in shapes.items() if len(s) == 1]
    n_2d = len(shapes) - len(one_d)
    fd, tmp = tempfile.mkstemp(prefix=".edgeq-overhead.", suffix=".gguf")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, GGUF_ARCH[ir.arch])
        try:
            write_model_header(w, ir, QType.F32, None)
            for n in one_d:
                arr = ir.linears[n[:-len(".bias")]].bias if n.endswith(".bias") else ir.tensors[n]
                w.add_tensor(gguf_tensor_name(n), np.ascontiguousarray(arr, dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
        return os.path.getsize(tmp) + 96 * n_2d
    finally:
        os.unlink(tmp)


# Rows encoded per chunk when a 2-D tensor is streamed (~16M values: 64 MB of float32 + the
# quantizer's temporaries), so a vocabulary-sized matrix never sits in memory in float32.
STREAM_CHUNK_VALUES = 1 << 24


def _encoded_nbytes(shape: tuple[int, ...], qt: QType) -> int:
    info = FORMATS[qt]
    n = int(np.prod(shape, dtype=np.int64))
    return n // info.block_size * info.type_size


def _tensor_info_args(shape: tuple[int, ...], qt: QType):
    """(shape, dtype, raw_dtype) as ``GGUFWriter.add_tensor`` would record them for the encoded tensor."""
    gguf = gguf_module()
    if qt == QType.F32:
        return shape, np.dtype(np.float32), None
    if qt == QType.F16:
        return shape, np.dtype(np.float16), None
    info = FORMATS[qt]
    return (*shape[:-1], shape[-1] // info.block_size * info.type_size), np.dtype(np.uint8), \
        gguf.GGMLQuantizationType[qt.value]


def _encoded_chunks(arr, qt: QType):
    """Yield the encoded bytes of ``arr`` (an array, a lazy tensor or ``_Raw``) in row chunks.

    GGML formats encode each row on its own, so chunked encoding gives exactly the bytes of a
    whole-tensor encode (tested); a lazy tensor is read chunk by chunk from its file."""
    if isinstance(arr, _Raw) or getattr(arr, "ndim", 1) < 2:
        yield _encode(arr, qt)[0]
        return
    rows = arr.shape[0]
    step = max(1, STREAM_CHUNK_VALUES // max(1, int(np.prod(arr.shape[1:], dtype=np.int64))))
    if step >= rows:
        yield _encode(arr, qt)[0]
        return
    for r0 in range(0, rows, step):
        yield _encode(np.asarray(arr[r0:r0 + step], dtype=np.float32), qt)[0]


def write_tensors(w, shapes: Mapping[str, tuple[int, ...]], types: Mapping[str, QType], array_of, label: str,
                  progress: bool) -> None:
    """Write header, metadata, tensor index, then each IR-named tensor (``array_of(name)`` gives
    its float32 data, lazily or as ``_Raw`` bytes) streamed: encoded and written one tensor (one
    row chunk of a large tensor) at a time, so memory is bounded by a chunk, not by the model.

    ``shapes``: IR name -> numpy shape, in file order. The bytes are those of gguf-py's in-memory
    ``add_tensor`` + ``write_tensors_to_file`` (same index, alignment and padding)."""
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        qt = types.get(name, QType.F32)
        tshape, dtype, raw = _tensor_info_args(shape, qt)
        w.add_tensor_info(gguf_tensor_name(name), tshape, dtype, _encoded_nbytes(shape, qt), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0] if isinstance(w.fout, list) else w.fout
    w.write_padding(fout, fout.tell())
    names = list(shapes)
    if progress:
        names = tqdm(names, desc=f"quantizing {label}", unit="tensor", leave=False)
    for name in names:
        qt = types.get(name, QType.F32)
        expected = _encoded_nbytes(tuple(shapes[name]), qt)
        written = 0
        for chunk in _encoded_chunks(array_of(name), qt):
            chunk.tofile(fout)
            written += chunk.nbytes
        if written != expected:
            raise EdgeqError(f"GGUF: {name}: wrote {written} bytes, expected {expected} for "
                             f"{tuple(shapes[name])} {qt.value}")
        w.write_padding(fout, written)


def write_gguf(ir: ModelIR, path: str | Path, types: Mapping[str, QType | str], *,
               extra_kv: Mapping[str, Any] | None = None, allow_low_rank: bool = False,
               progress: bool = False) -> Path:
    """Write ``ir`` as a GGUF model file stock llama.cpp loads; returns ``path``.

    ``progress``: show a tqdm bar (on stderr) over the tensors being quantized.

    ``types``: a plan from :func:`tensor_types` (IR names; missing names default to F32).
    Quantized data comes from :func:`edgeq.quant.reference.quantize` (bit-exact GGML blocks).
    The output is deterministic (fixed key and tensor order, default 32-byte alignment, no
    timestamps) and written atomically (temp file + ``os.replace``).

    LowRank branches are not part of a model GGUF: with any present this raises unless
    ``allow_low_rank=True`` (then only the base weights are written; ship the branches with
    :func:`write_lora_gguf`). ``extra_kv`` adds metadata keys (sorted; may not shadow ours).
    """
    gguf = gguf_module()
    types = {k: as_qtype(v) for k, v in types.items()}
    problems = check(ir, types, allow_low_rank=allow_low_rank)
    if problems:
        raise EdgeqError(f"GGUF: cannot write {Path(path).name}: {problems[0]}"
                         + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    hp = ir.hparams
    arch = GGUF_ARCH[hp.arch]
    base = base_type_of_plan(ir, types)
    shapes = tensor_shapes(ir)

    def array_of(name: str) -> np.ndarray:
        if name.endswith(".bias"):
            lin = ir.linears[name[: -len(".bias")]]
            return out_rows(ir, lin, lin.bias)
        if name in ir.linears:
            lin = ir.linears[name]
            qt = types.get(name, QType.F32)
            raw = packed_rows(ir, lin, qt)
            return _Raw(raw, qt) if raw is not None else out_rows(ir, lin, lin.weight)
        return ir.tensors[name]

    def fill(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        try:
            write_model_header(w, ir, base, extra_kv)
            write_tensors(w, shapes, types, array_of, Path(path).name, progress)
        finally:
            w.close()

    atomic_write_file(Path(path), fill)
    return Path(path)

