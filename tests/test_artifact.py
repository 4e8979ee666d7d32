"""edgeq.artifact: the tokenizer spec file (written by the ONNX / TVM lowerings, read by their runtimes)."""
import json

import pytest

from edgeq.artifact import read_tokenizer_spec, write_tokenizer_spec
from edgeq.errors import EdgeqError
from edgeq.frontend import load_model


def test_tokenizer_spec_round_trip(tiny_llama, tmp_path):
    ir = load_model(tiny_llama)
    write_tokenizer_spec(ir.tokenizer, tmp_path / "t.json")
    assert read_tokenizer_spec(tmp_path / "t.json") == ir.tokenizer
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(EdgeqError, match="tokenizer"):
        read_tokenizer_spec(tmp_path / "bad.json")
    with pytest.raises(EdgeqError, match="tokenizer"):
        read_tokenizer_spec(tmp_path / "missing.json")
