"""edgeq.families: each family's table against the libraries that define the names — gguf-py's
HF -> GGUF tensor map and architecture names, transformers' configs and models — and the rule
that family facts live only in the tables."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgeq.errors import EdgeqError
from edgeq.families import FAMILIES, RopeStyle, by_gguf_arch, by_hf_model_type, family
from edgeq.ir import Arch, Role

REPO = Path(__file__).resolve().parents[2]
IDS = [f.arch.value for f in FAMILIES]


def test_every_arch_has_one_family():
    assert sorted(f.arch for f in FAMILIES) == sorted(Arch)
    for f in FAMILIES:
        assert family(f.arch) is f and family(f.arch.value) is f
        assert by_hf_model_type(f.hf_model_type) is f and by_gguf_arch(f.gguf_arch) is f
    with pytest.raises(EdgeqError, match="unknown model family 'phi3'"):
        family("phi3")
    assert by_hf_model_type("phi3") is None and by_gguf_arch("phi3") is None
    # Gemma 3 checkpoints say "gemma3_text" (the multimodal "gemma3" wrapper is another model)
    assert by_hf_model_type("gemma3") is None and by_gguf_arch("gemma3") is family(Arch.GEMMA3)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_hf_names_map_to_the_gguf_names_gguf_py_maps_them_to(fam):
    gguf = pytest.importorskip("gguf")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == fam.gguf_arch)
    tmap = gguf.get_tensor_name_map(arch, 8)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    for hf, ir in fam.hf_tensors.items():
        hf3, ir3 = hf.format(bid=3), ir.format(bid=3)
        assert fam.ir_name_of_hf(hf3) == ir3
        theirs = tmap.get_name(hf3, try_suffixes=(".weight", ".bias"))
        ours = fam.gguf_tensors[ir].format(bid=3)
        assert theirs == ours, (hf3, theirs, ours)
    for ir, name in fam.gguf_tensors.items():
        assert re.sub(r"\.(weight|bias)$", "", name) in known, name
    assert (fam.ir_name_of_hf("model.layers.3.self_attn.q_norm.weight") is None) == (not fam.qk_norm)
    assert fam.hf_is_ignored("model.layers.3.self_attn.rotary_emb.inv_freq")


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_defaults_and_checkpoint_layout_match_transformers(fam):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(fam.hf_model_type)
    assert cfg.tie_word_embeddings == fam.tie_word_embeddings
    assert cfg.rms_norm_eps == fam.rms_norm_eps
    rope = getattr(cfg, "rope_parameters", None) or {}
    if fam.sliding_window:  # per layer type: the global layers' base is rope_theta
        assert rope["sliding_attention"]["rope_theta"] == fam.gguf_rope_local_theta
        assert cfg.layer_types.count("full_attention") == cfg.num_hidden_layers // fam.gguf_swa_pattern
        assert all((t == "full_attention") == ((i + 1) % fam.gguf_swa_pattern == 0)
                   for i, t in enumerate(cfg.layer_types))
        rope = rope["full_attention"]
    acts = {getattr(cfg, "hidden_activation", None) or cfg.hidden_act}
    assert acts <= set(fam.hf_activations)
    block = fam.gguf_block_hparams(16, 12, 8, 32)  # what a GGUF of the family means
    assert (block["layer_types"] is not None) == fam.sliding_window
    assert (block["embedding_scale"] == 4.0) == fam.scaled_embedding
    assert float(rope.get("rope_theta", getattr(cfg, "rope_theta", None))) == fam.rope_theta
    assert all(hasattr(transformers, c) for c in fam.hf_architectures)
    small = transformers.AutoConfig.for_model(fam.hf_model_type, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                              vocab_size=64)
    torch.manual_seed(0)
    model = getattr(transformers, fam.hf_architectures[0])(small)
    keys = list(model.state_dict())
    ir_names = {fam.ir_name_of_hf(k) for k in keys if not fam.hf_is_ignored(k)}
    assert None not in ir_names, [k for k in keys if fam.ir_name_of_hf(k) is None]
    has_q_bias = "blk.0.attn_q.bias" in ir_names
    assert has_q_bias == fam.attention_bias
    assert ("blk.0.attn_output.bias" in ir_names) is False
    for module, role in fam.peft_modules.items():  # PEFT target names are the linears' module names
        assert any(k.endswith(f".{module}.weight") and fam.ir_name_of_hf(k).endswith(role.value) for k in keys)
    norms = {n.split(".", 2)[2] for n in ir_names if n.startswith("blk.0.") and n.endswith("norm")}
    assert ("attn_q_norm" in norms) == fam.qk_norm and ("post_ffw_norm" in norms) == fam.sandwich_norm


def test_rope_permutation_only_where_llamacpp_pairs_differ():
    assert family(Arch.LLAMA).gguf_permute_qk  # llama: rope type NORM (adjacent pairs)
    assert not family(Arch.QWEN2).gguf_permute_qk  # qwen2: NEOX (rotate-half), as HF
    assert not family(Arch.GEMMA3).gguf_permute_qk  # gemma3: NEOX
    assert all(f.hf_rope == RopeStyle.ROTATE_HALF for f in FAMILIES)
    assert set(family(Arch.LLAMA).peft_modules.values()) == set(Role)


def test_family_facts_live_only_in_the_tables():
    """Outside edgeq/families (and the Arch enum in edgeq/ir.py) no code tests for a family by
    name: adding a family is a table, not a hunt for ``arch == ...``."""
    names = [f"Arch.{a.name}" for a in Arch] + [f"{f.arch.value!r}" for f in FAMILIES] + \
        [f'"{f.arch.value}"' for f in FAMILIES] + [c for f in FAMILIES for c in f.hf_architectures]
    allowed_strings = {'"qwen2"'}  # llama.cpp's pre-tokenizer name (edgeq/backends/gguf/tokenizer.py)
    bad = []
    for path in sorted((REPO / "edgeq").rglob("*.py")) + sorted((REPO / "runtimes").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("edgeq/families/") or rel == "edgeq/ir.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            for n in names:
                if n in code and not (rel == "edgeq/backends/gguf/tokenizer.py" and n in allowed_strings):
                    bad.append(f"{rel}:{i}: {n}")
    assert not bad, bad
