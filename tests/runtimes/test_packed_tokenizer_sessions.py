"""ONNX and TVM artifacts of a SentencePiece-style model carry the packed vocabulary
(``tokenizer.vocab.safetensors``) and their sessions tokenize with it: the same ids as transformers'
tokenizer of the checkpoint (the oracle), the same text back, chat template and EOS ids as the
spec path, and the ``tokenizers`` library never imported by the device process."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from edgeq.artifact import check_files, read_manifest, write_manifest
from edgeq.frontend import load_model
from edgeq.tokenizer_pack import VOCAB_FILE

REPO = Path(__file__).resolve().parents[2]
HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
TEXTS = ["Hello world", "abc def\n\nghi", "\u4e2d\u6587 and \U0001F642", ""]


def _onnx(ir, out):
    from edgeq.backends.onnx import lower as lo

    info = lo.write_onnx(ir, out, lo.OnnxOptions(linear="int4_g32_sym", head="int8_g32_sym"))
    write_manifest(out, {"format": "onnx", "onnx": info, "hparams": ir.hparams.to_json()})
    from runtimes.onnxrt import OnnxSession
    return OnnxSession


def _tvm(ir, out):
    if platform.machine() != "x86_64":
        pytest.skip("artifacts built for an x86 profile")
    from edgeq.backends.tvm import lower as lt

    info = lt.write_tvm(ir, out, lt.TvmOptions(bits=4, group=32, target=HOST))
    write_manifest(out, {"format": "tvm", "tvm": info, "hparams": ir.hparams.to_json()})
    from runtimes.tvmrt import TvmSession
    return TvmSession


@pytest.fixture(scope="module", params=["onnx", "tvm"])
def artifact(request, tiny_gemma3, tmp_path_factory):
    ir = load_model(tiny_gemma3)
    out = tmp_path_factory.mktemp(request.param) / "a"
    out.mkdir()
    session_cls = {"onnx": _onnx, "tvm": _tvm}[request.param](ir, out)
    return request.param, out, session_cls


def test_artifact_lists_and_hashes_the_packed_file(artifact):
    fmt, out, _ = artifact
    m = read_manifest(out)
    assert m[fmt]["tokenizer_vocab_file"] == VOCAB_FILE and VOCAB_FILE in m["files"]
    assert check_files(out, m) == []


def test_session_tokenizes_as_transformers(artifact, tiny_gemma3):
    from transformers import AutoTokenizer

    _, out, session_cls = artifact
    theirs = AutoTokenizer.from_pretrained(str(tiny_gemma3))
    s = session_cls(out)
    assert type(s.tokenizer).__name__ == "PackedTokenizer"
    for text in TEXTS:
        ids = s.tokenize(text)
        assert ids == theirs(text)["input_ids"]
        assert s.detokenize(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert s.eos_ids and theirs.eos_token_id in s.eos_ids
    assert s.has_chat_template == bool(theirs.chat_template)
    if theirs.chat_template:
        want = theirs.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
        assert s.apply_chat_template("Hi") == want


def test_device_process_does_not_import_tokenizers(artifact):
    fmt, out, session_cls = artifact
    code = (f"import sys; from {session_cls.__module__} import {session_cls.__name__} as S; "
            f"s = S({str(out)!r}); ids = s.tokenize('Hello world'); s.detokenize(ids); s.eos_ids; "
            "print(len(ids), 'tokenizers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    n, imported = r.stdout.split()
    assert int(n) > 1 and imported == "False"


def test_damaged_packed_file_is_an_error_line(artifact, tmp_path):
    import shutil

    from edgeq.errors import EdgeqError

    _, out, session_cls = artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / VOCAB_FILE).write_bytes(b"\x00" * 4)
    with pytest.raises(EdgeqError, match="corrupt packed tokenizer"):
        session_cls(copy).tokenize("Hello")
