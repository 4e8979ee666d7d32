"""edgeq.tokenizer_pack: which tokenizers are packed, deterministic bytes, and a damaged packed file
refused with one error line (never a traceback, never an id outside the vocabulary)."""
import json
import struct

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.frontend.tokenizer import load_tokenizer_spec
from edgeq.tokenizer_pack import packable, read_packed, write_packed


@pytest.fixture(scope="module")
def gemma_spec(tiny_gemma3):
    return load_tokenizer_spec(tiny_gemma3, "gemma3")


def test_byte_level_bpe_is_not_packed(tiny_llama, tmp_path):
    spec = load_tokenizer_spec(tiny_llama, "llama")
    assert packable(spec)[1] is not None
    assert not write_packed(spec, tmp_path / "t") and not (tmp_path / "t").exists()


@pytest.mark.parametrize("edit, why", [
    (lambda tj: tj.update(normalizer={"type": "NFKC"}), "normalizer NFKC"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Metaspace"}), "pre-tokenizer Metaspace"),
    (lambda tj: tj.update(decoder={"type": "Metaspace"}), "decoder Metaspace"),
    (lambda tj: tj["model"].update(dropout=0.1), "dropout"),
    (lambda tj: tj["model"].update(ignore_merges=True), "ignore_merges"),
    (lambda tj: tj["added_tokens"][0].update(lstrip=True), "lstrip"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "\u2581*[^\u2581]+|\u2581+"},
                                         "behavior": "Isolated", "invert": False}), "pre-tokenizer Split"),
    (lambda tj: tj.update(normalizer=None), "pre-tokenizer Split"),  # a Split on " " that now fires
])
def test_unsupported_shapes_keep_the_library_path(gemma_spec, edit, why, tmp_path):
    tj = json.loads(gemma_spec.tokenizer_json)
    edit(tj)
    spec = gemma_spec.__class__(**{**gemma_spec.__dict__, "tokenizer_json": json.dumps(tj)})
    assert why in packable(spec)[1]
    assert not write_packed(spec, tmp_path / "t")


def test_deterministic_bytes(gemma_spec, tmp_path):
    assert write_packed(gemma_spec, tmp_path / "a") and write_packed(gemma_spec, tmp_path / "b")
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    p = read_packed(tmp_path / "a")
    assert p.meta["n_vocab"] == len(gemma_spec.tokens)
    assert [p.token_bytes(i).decode() for i in range(len(gemma_spec.tokens))] == list(gemma_spec.tokens)


def _rewrite(path, out, header_edit=None, meta_edit=None, data_edit=None):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = bytearray(raw[8 + n:])
    if meta_edit:
        meta = json.loads(header["__metadata__"]["edgeq"])
        meta_edit(meta)
        header["__metadata__"]["edgeq"] = json.dumps(meta)
    if header_edit:
        header_edit(header)
    if data_edit:
        data_edit(header, data)
    text = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))
    return out


def _put(name, values):
    def edit(header, data):
        a, b = header[name]["data_offsets"]
        arr = np.frombuffer(bytes(data[a:b]), dtype={"I32": np.int32, "I64": np.int64, "U8": np.uint8}[
            header[name]["dtype"]]).copy()
        arr[: len(values)] = values
        data[a:b] = arr.tobytes()
    return edit


@pytest.mark.parametrize("damage, what", [
    (lambda p, o: o.write_bytes(p.read_bytes()[:5]), "truncated"),
    (lambda p, o: o.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"), "header length"),
    (lambda p, o: o.write_bytes(struct.pack("<Q", 2) + b"[]"), "header"),
    (lambda p, o: _rewrite(p, o, meta_edit=lambda m: m.update(format="other/9")), "format"),
    (lambda p, o: _rewrite(p, o, header_edit=lambda h: h.pop("merges.key")), "merges.key missing"),
    (lambda p, o: _rewrite(p, o, header_edit=lambda h: h["chars.id"].update(dtype="I64")), "chars.id layout"),
    (lambda p, o: _rewrite(p, o, header_edit=lambda h: h["vocab.bytes"].update(data_offsets=[0, 1 << 40])),
     "vocab.bytes layout"),
    (lambda p, o: _rewrite(p, o, data_edit=_put("merges.new_id", [1 << 30])), "merges.new_id out of range"),
    (lambda p, o: _rewrite(p, o, data_edit=_put("vocab.offsets", [5])), "vocab.offsets"),
    (lambda p, o: _rewrite(p, o, data_edit=_put("merges.key", [1 << 50])), "merge table"),
    (lambda p, o: _rewrite(p, o, meta_edit=lambda m: m.update(bos_id=10 ** 9)), "special ids"),
    (lambda p, o: _rewrite(p, o, meta_edit=lambda m: m.update(decoder=[["exec"]])), "decoder"),
])
def test_damaged_file_is_one_error_line(gemma_spec, tmp_path, damage, what):
    good = tmp_path / "good"
    assert write_packed(gemma_spec, good)
    bad = tmp_path / "bad"
    damage(good, bad)
    with pytest.raises(EdgeqError, match="corrupt packed tokenizer") as exc:
        read_packed(bad)
    assert what in str(exc.value) and "\n" not in str(exc.value)
