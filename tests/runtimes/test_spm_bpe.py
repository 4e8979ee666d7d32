"""runtimes.spm_bpe against the ``tokenizers`` library (the oracle: the library every Hugging Face
SentencePiece-style BPE is defined by) on the tokenizer.json the packed file was made from: the
real Gemma 3 vocabulary on WikiText-2, Alpaca and generated text; the tiny Gemma 3 tokenizer; and
variants built in code for the steps Gemma's file does not use (a Prepend normaliser, added tokens
matched after normalisation, a Strip decoder, unknown characters without byte fallback)."""
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer

from edgeq.frontend.tokenizer import load_tokenizer_spec
from edgeq.tokenizer_pack import read_packed, write_packed
from runtimes.spm_bpe import SpmBpe
from runtimes.text import PackedTokenizer, SpecTokenizer

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _pair(model_dir: Path, tmp: Path, arch: str = "gemma3"):
    spec = load_tokenizer_spec(model_dir, arch)
    path = tmp / "tok.safetensors"
    assert write_packed(spec, path)
    return Tokenizer.from_str(spec.tokenizer_json), SpmBpe(read_packed(path)), spec, path


def _same(hf, sp, text):
    for add in (True, False):
        assert sp.encode(text, add) == hf.encode(text, add_special_tokens=add).ids, (text, add)
    ids = hf.encode(text).ids
    for skip in (True, False):
        assert sp.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (text, skip)


@pytest.fixture(scope="module")
def gemma(gemma3_dir, tmp_path_factory):
    return _pair(gemma3_dir, tmp_path_factory.mktemp("gemma-tok"))


def test_gemma_wikitext_alpaca_and_chat(gemma):
    hf, sp, spec, _ = gemma
    wiki = (DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    chunk = wiki[:120_000]  # one piece: Gemma has no pre-tokenizer, BPE runs over the whole text
    assert sp.encode(chunk) == hf.encode(chunk).ids
    for line in wiki.splitlines()[:400]:
        _same(hf, sp, line)
    records = json.loads((DATA / "alpaca" / "alpaca_small.json").read_text(encoding="utf-8"))[:200]
    for r in records:
        _same(hf, sp, "\n\n".join(str(r.get(k, "")) for k in ("instruction", "input", "output")))
    chat = "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    _same(hf, sp, chat)
    assert sp.encode(chat, False).count(spec.tokens.index("<start_of_turn>")) == 2  # added tokens split out


_ALPHABET = st.one_of(st.characters(codec="utf-8"), st.sampled_from(
    ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "\n\n", "<td>", " ", "\u2581", "  ", "\t", "\ufffd",
     "\U0001F642", "\u4e2d", "é", "<unk>", "<0x41>"]))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(parts=st.lists(_ALPHABET, max_size=40))
def test_gemma_generated_text(gemma, parts):
    _same(*gemma[:2], "".join(parts))


def test_gemma_decodes_any_ids_as_the_library(gemma):
    hf, sp, spec, _ = gemma
    rng = random.Random(0)
    byte_ids = [i for i, t in enumerate(spec.tokens) if t.startswith("<0x")]
    for _ in range(300):  # random ids, runs of byte tokens (valid and invalid UTF-8), specials
        ids = [rng.choice(byte_ids) if rng.random() < 0.3 else rng.randrange(len(spec.tokens))
               for _ in range(rng.randrange(1, 24))]
        for skip in (True, False):
            assert sp.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip)


def test_session_tokenizer_equals_spec_tokenizer(gemma):
    """The runtime's two paths (packed file / tokenizers library) agree, BOS rule and chat included."""
    _, _, spec, path = gemma
    packed, lib = PackedTokenizer(path), SpecTokenizer(spec)
    for text in ("Hello there", "", "<start_of_turn>user\nHi<end_of_turn>"):
        for add in (True, False):
            assert packed.encode(text, add) == lib.encode(text, add)
    assert packed.eos_ids == lib.eos_ids and packed.eos_ids
    ids = lib.encode("The capital of France is Paris.")
    assert packed.decode(ids) == lib.decode(ids)
    assert packed.chat("Hi") == lib.chat("Hi")


def test_tiny_gemma_tokenizer(tiny_gemma3, tmp_path):
    hf, sp, _, _ = _pair(tiny_gemma3, tmp_path)
    rng = random.Random(1)
    letters = "abcdefghij klmno\n\u00e9\u4e2d\U0001F642"
    for _ in range(300):
        _same(hf, sp, "".join(rng.choice(letters) for _ in range(rng.randrange(0, 60))))


def _variant(tiny_gemma3: Path, out: Path, edit) -> Path:
    out.mkdir()
    for name in ("tokenizer_config.json",):
        (out / name).write_text((tiny_gemma3 / name).read_text(encoding="utf-8"), encoding="utf-8")
    tj = json.loads((tiny_gemma3 / "tokenizer.json").read_text(encoding="utf-8"))
    edit(tj)
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return out


def _llama2_style(tj):
    """Llama-2's legacy shape: a "\u2581" prepended to each piece, a Strip of the first space when
    decoding, and added tokens matched before and after normalisation."""
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tj["pre_tokenizer"] = None
    tj["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    n = max(tj["model"]["vocab"].values()) + 1
    for k, (content, special, normalized) in enumerate([("<sep>", True, False), ("ab cd", False, True),
                                                         ("xyz", False, True)]):
        tj["model"]["vocab"][content] = n + k
        tj["added_tokens"].append({"id": n + k, "content": content, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": normalized, "special": special})


def test_llama2_style_variant(tiny_gemma3, tmp_path):
    hf, sp, _, _ = _pair(_variant(tiny_gemma3, tmp_path / "v", _llama2_style), tmp_path, "llama")
    assert sp.meta["normalizer"][0][0] == "prepend" and sp.meta["decoder"][-1][0] == "strip"
    rng = random.Random(2)
    pieces = ["ab cd", "xyz", "<sep>", " ", "a", "b", "c", "d", "x", "\n", "\u4e2d", "k"]
    for _ in range(400):
        _same(hf, sp, "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 20))))


def test_unknown_characters_without_byte_tokens(tiny_gemma3, tmp_path):
    """Characters with neither a token nor all their byte tokens: the unknown token, runs fused."""
    def edit(tj):
        vocab = tj["model"]["vocab"]
        for t in [t for t in vocab if t in ("<0xE4>", "<0xB8>")]:
            vocab[f"<unused-{t}>"] = vocab.pop(t)  # keep ids dense: rename, not delete
        tj["model"]["merges"] = [m for m in tj["model"]["merges"]
                                 if not any(x in ("<0xE4>", "<0xB8>") for x in (m.split(" ") if isinstance(m, str) else m))]
    hf, sp, _, _ = _pair(_variant(tiny_gemma3, tmp_path / "v", edit), tmp_path)
    for text in ("a\u4e2d\u4e2db", "\u4e2d", "x \u4e2d y \u4e2d\u4e2d\u4e2d"):
        _same(hf, sp, text)
    assert sp.meta["unk_id"] in sp.encode("\u4e2d\u4e2d", False)
