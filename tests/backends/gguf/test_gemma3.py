"""Gemma 3 through the GGUF lowering: stock llama.cpp (llama-cpp-python) runs edgeq's ``gemma3``
files — sliding-window layers, QK-norm, sandwich norms, GeGLU, scaled embeddings — against the
numpy reference runtime, with the SentencePiece-style vocabulary tokenizing as the HF tokenizer
does; what llama.cpp's graph cannot run is refused with one line — per-layer MLP widths (structured
pruning) among it, while one width for every layer loads and runs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import llama_cpp  # noqa: F401

from edgeq.backends.gguf.lower import read_gguf, tensor_types, write_gguf
from edgeq.errors import EdgeqError
from edgeq.frontend import load_model

# llama.cpp evaluates GELU through ggml's own approximation; everything else is F32 rounding
F32_MAX_REL = 1e-3  # max |Δlogit| / max |logit|
# Q8_0/Q4_0 files: llama.cpp also rounds the activations to Q8_0 for its dot products
# (measured 0.030 for Q8_0 on this model); the reference computes with float activations
QUANT_MAX_REL = 0.06
TEXT = ("The quick brown fox jumps over the lazy dog. Once upon a time there was a little robot "
        "who lived in a quiet town by the sea. Café 2024!\n\tdef add(a, b):")
TEXTS = [TEXT, "  multiple   spaces\n\nnewlines", "x", "<start_of_turn>user\nhi<end_of_turn>\n"]


@pytest.fixture(scope="module")
def gemma_ir(tiny_gemma3):
    return load_model(tiny_gemma3)


@pytest.fixture(scope="module")
def f32_gguf(gemma_ir, tmp_path_factory):
    return write_gguf(gemma_ir, tmp_path_factory.mktemp("g3") / "f32.gguf", tensor_types(gemma_ir, 32))


def _session(path):
    from runtimes.llamacpp import LlamaCppSession

    return LlamaCppSession(path, n_ctx=128, kv_cache_type="f32")


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_llamacpp_logits_match_the_reference(gemma_ir, f32_gguf):
    from runtimes.reference import ReferenceSession

    ref = ReferenceSession(gemma_ir, n_ctx=128)
    ids = ref.tokenize(TEXT)
    assert len(ids) > 4 * gemma_ir.hparams.sliding_window  # the window is crossed
    with _session(f32_gguf) as s:
        got = s.logits(ids)
    want = ref.logits(ids)
    assert _rel(got, want) <= F32_MAX_REL
    # without the window the model is another one: the comparison above sees llama.cpp's SWA
    no_window = ReferenceSession(gemma_ir.replace(hparams=dataclasses.replace(gemma_ir.hparams, layer_types=None)),
                                 n_ctx=128).logits(ids)
    assert _rel(no_window, want) > 20 * F32_MAX_REL


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_files_run_close_to_their_dequantized_weights(gemma_ir, tmp_path, bits):
    from runtimes.reference import ReferenceSession

    path = write_gguf(gemma_ir, tmp_path / f"q{bits}.gguf", tensor_types(gemma_ir, bits))
    back = read_gguf(path)  # the dequantized weights llama.cpp computes with
    ref = ReferenceSession(back, n_ctx=128)
    ids = ReferenceSession(gemma_ir).tokenize(TEXT)
    with _session(path) as s:
        got = s.logits(ids)
    want = ref.logits(ids)
    assert _rel(got, want) <= QUANT_MAX_REL
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.9


def test_tokenizer_matches_hf(gemma_ir, f32_gguf):
    from runtimes.text import SpecTokenizer

    hf = SpecTokenizer(gemma_ir.tokenizer)
    with _session(f32_gguf) as s:
        for text in TEXTS:
            ids = s.tokenize(text)
            assert ids == hf.encode(text), text
            assert s.detokenize(ids) == hf.decode(ids), text
        assert s.tokenize("x")[0] == gemma_ir.tokenizer.bos_id == 2
        assert s.eos_ids == hf.eos_ids


def test_tokenizer_json_rebuilt_from_gguf_metadata_encodes_the_same(gemma_ir, f32_gguf):
    """A gemma3 GGUF as input: the SentencePiece vocabulary (tokens, scores, types) becomes an HF
    tokenizer.json again, which tokenizes and detokenizes as the original does."""
    from runtimes.text import SpecTokenizer

    back, orig = SpecTokenizer(read_gguf(f32_gguf).tokenizer), SpecTokenizer(gemma_ir.tokenizer)
    for text in TEXTS + [TEXT * 5]:
        ids = orig.encode(text)
        assert back.encode(text) == ids, text
        assert back.decode(ids) == orig.decode(ids), text


def test_read_back_is_the_same_model(gemma_ir, f32_gguf):
    back = read_gguf(f32_gguf)
    assert back.hparams == gemma_ir.hparams
    assert back.tokenizer.scores == gemma_ir.tokenizer.scores
    assert back.tokenizer.add_space_prefix is False and back.tokenizer.model == "llama"
    for name, t in gemma_ir.tensors.items():
        assert np.array_equal(np.asarray(back.tensors[name]), np.asarray(t)), name
    for name, lin in gemma_ir.linears.items():
        assert np.array_equal(np.asarray(back.linears[name].weight), lin.weight), name


@pytest.mark.parametrize("change, words", [
    (dict(query_pre_attn_scalar=24.0), "query_pre_attn_scalar"),
    (dict(rope_local_theta=20000.0), "rope_local_theta"),
    (dict(layer_types=("full_attention",) * 6), "layer_types"),
])
def test_what_llamacpp_cannot_run_is_refused(gemma_ir, tmp_path, change, words):
    ir = gemma_ir.replace(hparams=dataclasses.replace(gemma_ir.hparams, **change))
    with pytest.raises(EdgeqError, match=words) as exc:
        write_gguf(ir, tmp_path / "bad.gguf", tensor_types(ir, 32))
    assert "\n" not in str(exc.value) and not (tmp_path / "bad.gguf").exists()


def test_pruned_mlp_runs_at_one_width_and_a_bias_is_refused(gemma_ir, tmp_path):
    """llama.cpp's gemma3 creates every layer's MLP at layer 0's width (n_ff(0)): a rate is written
    with every layer at one width — the plan's own where its layers agree, else the mean of its
    per-layer widths rounded to the granularity (gguf_prune_spec) — loads as ``gemma3`` and
    computes the reference runtime's model at those widths; a bias on ffn_down (what --prune-bias
    folds) has no gemma3 form and is refused with one line, nothing written."""
    from edgeq.backends.gguf.rates import gguf_prune_spec, reference_ir_for_gguf_rate, write_gguf_at_rate
    from edgeq.ir import PruneSpec, full_widths
    from runtimes.reference import ReferenceSession

    hp = gemma_ir.hparams
    full = full_widths(hp)
    one = tuple(dataclasses.replace(full, ffn=96) for _ in range(hp.num_layers))
    mixed = (dataclasses.replace(full, ffn=32),) * 2 + one[2:]  # per-layer widths whose mean is between steps
    spec = lambda ws: PruneSpec(rates=(0.0, 0.25), granularity=32,  # noqa: E731
                                widths={0.0: (full,) * hp.num_layers, 0.25: ws})
    mean = sum(w.ffn for w in mixed) / hp.num_layers
    for name, ws, width in (("one", one, 96), ("mixed", mixed, 32 * int(mean / 32 + 0.5))):
        ir = gemma_ir.replace(prune=spec(ws))
        assert [w.ffn for w in gguf_prune_spec(ir).at(0.25)] == [width] * hp.num_layers
        path = write_gguf_at_rate(ir, 0.25, tmp_path / f"{name}.gguf", 32)
        ref = ReferenceSession(reference_ir_for_gguf_rate(ir, 0.25), n_ctx=128)
        ref.set_prune_rate(0.25)
        ids = ref.tokenize(TEXT)
        want = ref.logits(ids)
        with _session(path) as s:
            assert s.metadata()["general.architecture"] == "gemma3"
            assert int(s.metadata()["gemma3.feed_forward_length"]) == width
            got = s.logits(ids)
        assert _rel(got, want) <= F32_MAX_REL, name
        assert _rel(ReferenceSession(gemma_ir, n_ctx=128).logits(ids), want) > 20 * F32_MAX_REL  # pruned for real
    ir = gemma_ir.replace(prune=spec(one))
    down = ir.linears["blk.0.ffn_down"]
    biased = ir.replace(linears={**ir.linears, down.name: dataclasses.replace(
        down, bias=np.ones(down.out_features, np.float32))})  # as --prune-bias folds a rate's vector
    with pytest.raises(EdgeqError, match=r"n_ff\(0\)") as exc:
        write_gguf_at_rate(biased, 0.25, tmp_path / "bias.gguf", 32)
    assert "\n" not in str(exc.value) and not (tmp_path / "bias.gguf").exists()
