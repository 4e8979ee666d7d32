"""GGML quantization formats: sizes and bit-exact numpy reference quantizers."""
from edgeq.quant.formats import FORMATS, FormatInfo, QType, as_qtype, format_info, row_nbytes, tensor_nbytes
from edgeq.quant.reference import dequantize, quantize, roundtrip

__all__ = [
    "FORMATS",
    "FormatInfo",
    "QType",
    "as_qtype",
    "format_info",
    "row_nbytes",
    "tensor_nbytes",
    "quantize",
    "dequantize",
    "roundtrip",
]
