"""llama.cpp runtime (llama-cpp-python) on the tiny Llama/Qwen2 checkpoints, against the numpy
reference runtime and the Hugging Face tokenizer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llama_cpp  # noqa: F401
import gguf  # noqa: F401

from edgeq.errors import EdgeqError  # noqa: E402

# F32 weights and F32 KV cache: only float rounding separates llama.cpp from the reference.
F32_MAX_ABS_DIFF = 1e-3
# the same context evaluated in one batch or in chunks / token by token
INCREMENTAL_MAX_ABS_DIFF = 1e-4
TEXTS = ["Hello world! 123 the quick brown fox", "  multiple   spaces\n\nnewlines\ttabs 2024",
         "Café déjà vu. <|im_start|>user\nhi<|im_end|>", "x"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama, tiny_qwen2, tiny_llama_lora, tiny_qwen2_lora):
    """arch -> (ir, F32 GGUF path, ir with adapter 'ft', LoRA GGUF path)."""
    from edgeq.frontend import load_adapter, load_model
    from edgeq.backends.gguf.lower import tensor_types, write_gguf, write_lora_gguf

    out = tmp_path_factory.mktemp("llamacpp")
    res = {}
    for arch, model_dir, lora_dir in (("llama", tiny_llama, tiny_llama_lora), ("qwen2", tiny_qwen2, tiny_qwen2_lora)):
        ir = load_model(model_dir)
        path = write_gguf(ir, out / f"{arch}.gguf", tensor_types(ir, 32))
        ir_ft = load_adapter(ir, lora_dir, "ft")
        lora = write_lora_gguf(ir_ft, "ft", out / f"{arch}-ft.gguf")
        res[arch] = (ir, path, ir_ft, lora)
    return res


@pytest.fixture(params=["llama", "qwen2"])
def arch(request):
    return request.param


def _session(path, **kw):
    from runtimes.llamacpp import LlamaCppSession

    kw.setdefault("n_ctx", 128)
    kw.setdefault("kv_cache_type", "f32")
    return LlamaCppSession(path, **kw)


def _reference(ir):
    from runtimes.reference import ReferenceSession

    return ReferenceSession(ir, n_ctx=128)


def test_logits_match_reference(built, arch):
    ir, path, _, _ = built[arch]
    ref = _reference(ir)
    ids = ref.tokenize(TEXTS[0])
    with _session(path) as s:
        got = s.logits(ids)
        again = s.logits(ids)  # a fresh context each call
    assert got.shape == (len(ids), ir.hparams.vocab_size) and got.dtype == np.float32
    assert np.array_equal(got, again)
    assert np.abs(got - ref.logits(ids)).max() < F32_MAX_ABS_DIFF


def test_incremental_and_chunked_evaluation_agree(built, arch):
    ir, path, _, _ = built[arch]
    ids = _reference(ir).tokenize(TEXTS[1])
    with _session(path) as s:
        full = s.logits(ids)
        last = s._start(ids[:5])
        rows = [last]
        for t in ids[5:]:
            rows.append(s._step(t))
    assert np.abs(np.stack(rows) - full[4:]).max() < INCREMENTAL_MAX_ABS_DIFF
    with _session(path, n_batch=4) as s:  # several llama_decode calls per logits()
        assert np.abs(s.logits(ids) - full).max() < INCREMENTAL_MAX_ABS_DIFF


def test_last_logits_are_the_last_rows_of_logits(built, arch):
    """Only the last n positions' logits computed (LAMBADA's teacher-forced check), across batch
    boundaries too: the same rows as logits()[-n:], and the reference runtime's likewise."""
    ir, path, _, _ = built[arch]
    ref = _reference(ir)
    ids = ref.tokenize(TEXTS[1])
    assert len(ids) > 9
    for n_batch in (512, 4):  # one llama_decode call, or several with the rows split across them
        with _session(path, n_batch=n_batch) as s:
            full = s.logits(ids)
            for n in (1, 3, 5, len(ids)):
                got = s.last_logits(ids, n)
                assert got.shape == (n, ir.hparams.vocab_size)
                assert np.abs(got - full[-n:]).max() < INCREMENTAL_MAX_ABS_DIFF, (n_batch, n)
            with pytest.raises(ValueError):
                s.last_logits(ids, 0)
    rfull = ref.logits(ids)
    for n in (1, 4):
        assert np.abs(ref.last_logits(ids, n) - rfull[-n:]).max() < 1e-5  # (BLAS on fewer rows: last bits)


def test_greedy_generation_matches_reference(built, arch):
    ir, path, _, _ = built[arch]
    ref = _reference(ir)
    ids = ref.tokenize(TEXTS[0])
    with _session(path) as s:
        got = list(s.generate_ids(ids, 12, stop_at_eos=False))
        stats = s.last_stats
        text = "".join(s.generate(TEXTS[0], max_tokens=6, stop_at_eos=False))
    assert got == list(ref.generate_ids(ids, 12, stop_at_eos=False))
    assert stats.new_tokens == 12 and stats.prompt_tokens == len(ids) and stats.prefill_seconds > 0
    # the text path (tokenize, greedy decode, detokenize) gives the reference's text
    want = "".join(ref.generate(TEXTS[0], max_tokens=6, stop_at_eos=False))
    assert text == want and len(want) > 0


def test_tokenizer_matches_hf(built, arch):
    ir, path, _, _ = built[arch]
    from runtimes.text import SpecTokenizer

    hf = SpecTokenizer(ir.tokenizer)
    with _session(path) as s:
        for text in TEXTS:
            ids = s.tokenize(text)
            assert ids == hf.encode(text), text
            assert s.tokenize(text, add_special=False) == hf.encode(text, add_special=False), text
            assert s.detokenize(ids) == hf.decode(ids), text
        if ir.tokenizer.add_bos:
            assert s.tokenize("x")[0] == ir.tokenizer.bos_id
        assert ir.tokenizer.eos_id in s.eos_ids
        assert s.eos_ids == hf.eos_ids


def test_chat_template_matches_reference(built, arch):
    ir, path, _, _ = built[arch]
    from runtimes.text import render_chat

    with _session(path) as s:
        assert s.apply_chat_template("hi there") == render_chat(ir.tokenizer, "hi there")


def test_lora_adapter_matches_merged_model(built, arch):
    from edgeq.frontend import merge_adapters

    ir, path, ir_ft, lora = built[arch]
    ref = _reference(merge_adapters(ir_ft))
    ids = ref.tokenize(TEXTS[2])
    with _session(path, lora_paths=[lora]) as s:
        got = s.logits(ids)
    want = ref.logits(ids)
    assert np.abs(want - _reference(ir).logits(ids)).max() > 0.05  # the adapter does something
    assert np.abs(got - want).max() < F32_MAX_ABS_DIFF


def test_errors_are_edgeq_errors(built, tmp_path):
    _, path, _, _ = built["llama"]
    with pytest.raises(EdgeqError, match="no such GGUF"):
        _session(tmp_path / "nope.gguf")
    with pytest.raises(EdgeqError, match="no such LoRA"):
        _session(path, lora_paths=[tmp_path / "nope.gguf"])
    with pytest.raises(EdgeqError, match="could not load the LoRA"):
        _session(built["llama"][1], lora_paths=[built["qwen2"][3]])  # arch mismatch
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(EdgeqError, match="could not load"):
        _session(bad)
    with _session(path, n_ctx=16) as s:
        with pytest.raises(EdgeqError, match="out of range"):
            s.logits([1, 10 ** 6])
        with pytest.raises(EdgeqError, match="exceeds n_ctx"):
            s.logits(list(range(20)))
        with pytest.raises(EdgeqError, match="empty"):
            s.logits([])
    with pytest.raises(EdgeqError, match="kv_cache_type"):
        _session(path, kv_cache_type="q3")


def test_works_without_torch(built):
    """Device side: read the GGUF and run it with torch/transformers made unimportable."""
    repo = Path(__file__).resolve().parents[2]
    path = built["llama"][1]
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from runtimes.llamacpp import LlamaCppSession\n"
            "from edgeq.backends.gguf.lower import read_gguf\n"
            f"ir = read_gguf({str(path)!r})\n"
            f"s = LlamaCppSession({str(path)!r}, n_ctx=32)\n"
            "assert s.logits(s.tokenize('hello')).shape[1] == ir.hparams.vocab_size\n"
            "s.close()\n")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

