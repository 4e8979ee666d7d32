import json
import shutil

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.frontend import load_adapter, load_model, merge_adapters
from edgeq.ir import Role

MERGE_RTOL = 1e-5  # the bound: merged weights match peft's merge_and_unload


def _peft_merged_state(model_dir, adapter_dir):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return {k: v.detach().numpy() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_merge_matches_peft_merge_and_unload(which, tiny_llama, tiny_qwen2, tiny_llama_lora, tiny_qwen2_lora):
    model_dir, adapter_dir = {"llama": (tiny_llama, tiny_llama_lora), "qwen2": (tiny_qwen2, tiny_qwen2_lora)}[which]
    ref = _peft_merged_state(model_dir, adapter_dir)
    base = load_model(model_dir)
    ir = merge_adapters(load_adapter(base, adapter_dir, "a"))
    changed = 0
    for i in range(ir.hparams.num_layers):
        for role, mod in [(Role.Q, "self_attn.q_proj"), (Role.K, "self_attn.k_proj"), (Role.V, "self_attn.v_proj"),
                          (Role.O, "self_attn.o_proj"), (Role.GATE, "mlp.gate_proj"), (Role.UP, "mlp.up_proj"),
                          (Role.DOWN, "mlp.down_proj")]:
            ours = ir.linear(i, role).weight
            theirs = ref[f"model.layers.{i}.{mod}.weight"]
            rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
            assert rel <= MERGE_RTOL, (i, role, rel)
            assert ir.linear(i, role).low_rank == ()
            changed += not np.array_equal(ours, base.linear(i, role).weight)
    assert changed == 7 * ir.hparams.num_layers  # the adapter really touched every target


def test_separate_adapter_is_kept_as_branches(tiny_llama, tiny_llama_lora):
    ir = load_adapter(load_model(tiny_llama), tiny_llama_lora, "mine")
    lin = ir.linear(0, Role.Q)
    (lr,) = lin.low_rank
    cfg = json.loads((tiny_llama_lora / "adapter_config.json").read_text())
    assert lr.source == "lora:mine" and lr.rank == cfg["r"]
    assert lr.scale == pytest.approx(cfg["lora_alpha"] / cfg["r"])
    assert ir.adapters["mine"]["sha256"]


def test_adapter_for_another_architecture_is_refused(tiny_llama, tiny_qwen2_lora):
    with pytest.raises(EdgeqError, match=r"does not match the model: it was trained on a qwen2 model"):
        load_adapter(load_model(tiny_llama), tiny_qwen2_lora)


def test_adapter_with_other_shapes_is_refused_naming_first_mismatch(tiny_llama, tiny_llama_lora, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "lora"
    shutil.copytree(tiny_llama_lora, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/another-model"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(bad / "adapter_model.safetensors")
    for k in list(t):  # a base with a wider MLP: down_proj's input dim differs from layer 1 on
        if ".layers.1.mlp.down_proj.lora_A" in k:
            t[k] = np.concatenate([t[k], t[k]], axis=1)
    save_file(t, bad / "adapter_model.safetensors")
    with pytest.raises(EdgeqError, match=r"another base model\?\): blk\.1\.ffn_down expects in=128"):
        load_adapter(load_model(tiny_llama), bad)


def test_adapter_with_unknown_target_module_is_refused(tiny_llama, tiny_llama_lora, tmp_path):
    bad = tmp_path / "lora"
    shutil.copytree(tiny_llama_lora, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "conv1d"]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgeqError, match="conv1d"):
        load_adapter(load_model(tiny_llama), bad)


def test_adapter_with_more_layers_than_model_is_refused(tiny_llama, tiny_llama_lora, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "lora"
    shutil.copytree(tiny_llama_lora, bad)
    t = load_file(bad / "adapter_model.safetensors")
    for k in list(t):
        if ".layers.0." in k:
            t[k.replace(".layers.0.", ".layers.7.")] = t[k]
    save_file(t, bad / "adapter_model.safetensors")
    with pytest.raises(EdgeqError, match="blk.7"):
        load_adapter(load_model(tiny_llama), bad)


def test_truncated_adapter_is_refused(tiny_llama, tiny_llama_lora, tmp_path):
    bad = tmp_path / "lora"
    shutil.copytree(tiny_llama_lora, bad)
    f = bad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(EdgeqError, match="truncated"):
        load_adapter(load_model(tiny_llama), bad)
