"""What keeps a ModelIR (and a type plan) from becoming a GGUF stock llama.cpp loads."""
from __future__ import annotations

from typing import Mapping

from edgeq.backends.gguf.layout import GGUF_ARCH, tensor_shapes
from edgeq.backends.gguf.tokenizer import KNOWN_PRE
from edgeq.errors import EdgeqError
from edgeq.families import family
from edgeq.ir import TOKENIZER_BPE, TOKENIZER_SPM, ModelIR, Role
from edgeq.quant.formats import FORMATS, QType, as_qtype


def check(ir: ModelIR, types: Mapping[str, QType | str] | None = None, *,
          allow_low_rank: bool = False, as_deci: bool = False) -> list[str]:
    """Problems that keep ``ir`` (with the type plan ``types``, if given) from being written as
    a GGUF stock llama.cpp loads. Empty list: good to go.

    LowRank branches count as a problem unless ``allow_low_rank`` (a model GGUF has no place
    for them; they ship as LoRA-adapter GGUFs via :func:`write_lora_gguf`)."""
    problems: list[str] = []
    hp = ir.hparams
    if hp.arch not in GGUF_ARCH:
        problems.append(f"architecture {getattr(hp.arch, 'value', hp.arch)!r} is not supported by the GGUF "
                        f"lowering (supported: {[a.value for a in GGUF_ARCH]})")
    try:
        ir.validate()
    except EdgeqError as exc:
        problems.append(str(exc))
        return problems
    if hp.head_dim % 2:
        problems.append(f"head_dim {hp.head_dim} is odd; RoPE needs an even head dimension")
    fam = family(hp.arch)
    graph = fam.gguf_block_hparams(hp.hidden_size, hp.num_layers, hp.head_dim, hp.sliding_window)
    for key, want in graph.items():
        if getattr(hp, key) != want:
            problems.append(f"llama.cpp's {fam.gguf_arch} graph runs {key} = {want!r}, this model has "
                            f"{getattr(hp, key)!r}")
    if fam.gguf_needs_full_heads and hp.num_heads * hp.head_dim != hp.hidden_size:
        problems.append(f"{fam.gguf_arch} in llama.cpp needs num_heads*head_dim == hidden_size, got "
                        f"{hp.num_heads}*{hp.head_dim} != {hp.hidden_size}")
    if not fam.gguf_loads_o_bias and not as_deci and any(
            l.role == Role.O and l.bias is not None for l in ir.linears.values()):
        problems.append(f"llama.cpp's {fam.gguf_arch} architecture loads no attn_output bias (write it as 'deci', "
                        "see edgeq.backends.gguf.rates)")
    tok = ir.tokenizer
    if tok is None:
        problems.append("no tokenizer: a GGUF model needs tokenizer.ggml.* metadata")
    else:
        if tok.model not in (TOKENIZER_BPE, TOKENIZER_SPM):
            problems.append(f"tokenizer model {tok.model!r} is not supported "
                            f"(supported: {TOKENIZER_BPE!r}, {TOKENIZER_SPM!r})")
        if tok.model == TOKENIZER_SPM and (tok.scores is None or len(tok.scores) != len(tok.tokens)):
            problems.append(f"a {TOKENIZER_SPM!r} tokenizer needs one score per token")
        if tok.pre not in KNOWN_PRE:
            problems.append(f"tokenizer pre {tok.pre!r} is unknown to llama.cpp "
                            f"(known here: {sorted(KNOWN_PRE)})")
        if len(tok.tokens) > hp.vocab_size:
            problems.append(f"tokenizer has {len(tok.tokens)} tokens but the embedding has only "
                            f"{hp.vocab_size} rows")
        if len(tok.token_types) != len(tok.tokens):
            problems.append(f"tokenizer has {len(tok.tokens)} tokens but {len(tok.token_types)} token types")
    for name, lin in ir.linears.items():
        if lin.low_rank and not allow_low_rank:
            srcs = sorted({lr.source for lr in lin.low_rank})
            problems.append(f"{name} has low-rank branches {srcs}: merge them or write them with "
                            f"write_lora_gguf (write_gguf(..., allow_low_rank=True))")
            break
    if types is not None:
        shapes = tensor_shapes(ir)
        unknown = sorted(set(types) - set(shapes))
        if unknown:
            problems.append(f"type plan names unknown tensors {unknown[:3]}")
        for name, shape in shapes.items():
            qt_raw = types.get(name, QType.F32)
            try:
                qt = as_qtype(qt_raw)
            except EdgeqError as exc:
                problems.append(f"{name}: {exc}")
                continue
            if len(shape) == 1 and qt != QType.F32:
                problems.append(f"{name}: 1-D tensors must be F32, got {qt.value}")
            elif shape[-1] % FORMATS[qt].block_size:
                problems.append(f"{name}: {qt.value} needs a row length that is a multiple of "
                                f"{FORMATS[qt].block_size}, got {shape[-1]}")
    return problems

