import json
import shutil

import numpy as np
import pytest

from edgeq.errors import EdgeqError
from edgeq.frontend import load_adapter, load_model, merge_adapters
from edgeq.ir import Role

MERGE_RTOL = 1e-5  # the bound: merged weights match peft's merge_and_unload


def _peft_merged_state(model_dir, adapter_dir):
    import torch
    import peft
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


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


QWEN2_MAPPING = {"base_model_class": "Qwen2ForCausalLM", "parent_library": "transformers.models.qwen2.modeling_qwen2"}


@pytest.mark.parametrize("recorded", [
    {"auto_mapping": QWEN2_MAPPING},
    {"auto_mapping": {"base_model_class": "Qwen2ForCausalLM"}},
    {"auto_mapping": {"base_model_class": "PeftCustomModel", "parent_library": "transformers.models.qwen2.modeling_qwen2"}},
    {"base_model_class": "Qwen2ForCausalLM"},
    {"auto_mapping": {"base_model_class": "MistralForCausalLM"}},
])
def test_adapter_recording_another_base_class_is_refused_even_with_the_same_shapes(
        tiny_llama, tiny_qwen2_lora, tmp_path, recorded):
    """Issue 18 defect 3: a Qwen2 adapter (same shapes as the tiny Llama) whose base is a hub id
    not on this machine used to be applied silently; the class PEFT recorded says otherwise."""
    bad = _with_config(tiny_qwen2_lora, tmp_path / "lora", base_model_name_or_path="Qwen/Qwen2-0.5B", **recorded)
    with pytest.raises(EdgeqError, match=r"adapter 'lora' does not match the model: it was trained on a "):
        load_adapter(load_model(tiny_llama), bad)


def test_adapter_recording_this_base_class_is_applied_and_recorded(tiny_llama, tiny_llama_lora, tmp_path):
    ok = _with_config(tiny_llama_lora, tmp_path / "lora", base_model_name_or_path="meta-llama/Llama-3.2-1B",
                      auto_mapping={"base_model_class": "LlamaForCausalLM",
                                    "parent_library": "transformers.models.llama.modeling_llama"})
    ir = load_adapter(load_model(tiny_llama), ok)
    assert ir.adapters["lora"]["base_model_class"] == "LlamaForCausalLM"
    assert ir.adapters["lora"]["base_model"] == "meta-llama/Llama-3.2-1B"


def test_adapter_whose_local_base_lists_another_class_is_refused(tiny_llama, tiny_qwen2, tiny_qwen2_lora, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_qwen2, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("model_type")  # only the architectures list says what it is
    (base / "config.json").write_text(json.dumps(cfg))
    bad = _with_config(tiny_qwen2_lora, tmp_path / "lora", base_model_name_or_path=str(base))
    with pytest.raises(EdgeqError, match=r"trained on a Qwen2ForCausalLM \(adapter_config.json base_model_name_or_path"):
        load_adapter(load_model(tiny_llama), bad)


def test_cli_build_with_another_base_class_adapter_is_one_error_line(tiny_llama, tiny_qwen2_lora, tmp_path):
    from click.testing import CliRunner

    from edgeq.cli import main

    bad = _with_config(tiny_qwen2_lora, tmp_path / "lora", base_model_name_or_path="Qwen/Qwen2-0.5B",
                       auto_mapping=QWEN2_MAPPING)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["build", str(tiny_llama), "--adapter", str(bad), "-o", str(out)])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Qwen2ForCausalLM" in errors[0], r.output
    assert not out.exists()
