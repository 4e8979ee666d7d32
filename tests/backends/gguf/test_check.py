"""edgeq.backends.gguf.check: what keeps a ModelIR from becoming a GGUF llama.cpp loads."""
from __future__ import annotations

import dataclasses

import pytest

from edgeq.errors import EdgeqError
from edgeq.ir import Arch, Role
from edgeq.backends.gguf.lower import check, tensor_types, write_gguf
from edgeq.quant import QType
# registered by conftest.py (the tests are not a package)
from edgeq_tests_gguf_tiny import add_lora, tiny_ir


def test_check_reports_problems():
    ir = tiny_ir()
    assert check(ir) == []
    assert check(ir, tensor_types(ir, 4)) == []
    bad_tok = ir.replace(tokenizer=dataclasses.replace(ir.tokenizer, pre="no-such-pre"))
    assert any("pre" in p for p in check(bad_tok))
    assert any("tokenizer" in p for p in check(ir.replace(tokenizer=None)))
    q = tiny_ir(Arch.QWEN2)
    hp = dataclasses.replace(q.hparams, head_dim=8)
    assert check(q.replace(hparams=hp))  # shapes no longer match the hparams
    assert any("1-D" in p for p in check(ir, {"output_norm": QType.Q8_0}))
    lora = add_lora(ir, "x", 0, roles=(Role.Q,))
    assert any("low-rank" in p for p in check(lora))
    assert check(lora, allow_low_rank=True) == []
    with pytest.raises(EdgeqError, match="low-rank"):
        write_gguf(lora, "/nonexistent/x.gguf", tensor_types(lora, 32))
