"""models.train_lora: the chat-template option for a tokenizer without a template of its own
(a base checkpoint such as Gemma 3 270M)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edgeq.chat_template import resolve
from models.train_lora import IGNORE_INDEX, encode_example, main

RECORD = {"instruction": "Name a colour.", "input": "  of the sky  ", "output": "Blue, on a clear day."}


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_builtin_template_gives_the_tokens_of_the_models_own_template(tiny_gemma3):
    # oracle: transformers renders the tiny checkpoint's own Gemma template (which writes BOS itself);
    # the built-in "gemma" is rendered by edgeq and takes BOS from the tokenizer's rule
    tok = _tokenizer(tiny_gemma3)
    msgs = [{"role": "user", "content": "Name a colour.\n\nof the sky"},
            {"role": "assistant", "content": "Blue, on a clear day."}]
    want_prompt = list(tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"])
    want_full = list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False,
                                             return_dict=True)["input_ids"])
    ids, labels = encode_example(tok, RECORD, 512, resolve("gemma"))
    assert ids == want_full
    assert ids[0] == tok.bos_token_id
    n = len(want_prompt)
    assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:]
    # and the tokenizer's own template (no option) gives the same example
    assert encode_example(tok, RECORD, 512) == (ids, labels)


def _without_template(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([RECORD, {"instruction": "Add 2 and 3.", "input": "", "output": "5"}] * 4))
    return path


def test_a_tokenizer_without_a_template_needs_the_option(tiny_gemma3, tmp_path, capsys):
    model = _without_template(tiny_gemma3, tmp_path / "base")
    out = tmp_path / "lora"
    assert main(["--model", str(model), "--out", str(out), "--data", str(_data(tmp_path)), "--steps", "1",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--chat-template" in err[0]
    assert not out.exists()
    assert main(["--model", str(model), "--out", str(out), "--data", str(_data(tmp_path)), "--steps", "1",
                 "--chat-template", "no-such-template", "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith("error: --chat-template")
    assert not out.exists()


def test_training_with_the_option_writes_an_adapter_edgeq_merges(tiny_gemma3, tmp_path):
    from edgeq.frontend import load_adapter, load_model, merge_adapters

    model = _without_template(tiny_gemma3, tmp_path / "base")
    out = tmp_path / "lora"
    args = ["--model", str(model), "--out", str(out), "--data", str(_data(tmp_path)), "--steps", "2",
            "--batch-size", "2", "--max-len", "64", "--lr", "1e-2", "--chat-template", "gemma", "--no-progress"]
    assert main(args) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["chat_template"] == "gemma" and len(log["loss"]) == 2
    base = load_model(model)
    merged = merge_adapters(load_adapter(load_model(model), out))
    changed = [n for n, lin in merged.linears.items()
               if np.abs(np.asarray(lin.weight) - np.asarray(base.linears[n].weight)).max() > 0]
    assert len(changed) == len(base.linears)  # every linear of the targets moved off the base weights
