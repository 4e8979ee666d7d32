"""models/scale.py: random-weight checkpoints with real Llama shapes, written streaming."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402

from edgeq.frontend import load_model  # noqa: E402
from models import MARKER, read_marker  # noqa: E402
from models.scale import (  # noqa: E402
    GIB, SHAPES, bf16_round_, main, make_scale, n_params, plan_shards, tensor_specs)

SHARD = 100_000  # bytes: splits the test-tiny model (0.72 MB) into several shards


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return make_scale(tmp_path_factory.mktemp("scale") / "tt", "test-tiny", seed=3, tokenizer="tiny",
                      max_shard_bytes=SHARD)


def _read_all(ckpt: Path) -> dict[str, "torch.Tensor"]:
    """Every tensor, through the safetensors package's own reader (the oracle)."""
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


@pytest.mark.parametrize("shape,params", [
    # published parameter counts of meta-llama/Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B
    ("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824), ("llama-3.1-8b", 8_030_261_248)])
def test_real_shapes_have_the_published_parameter_counts(shape, params):
    assert n_params(SHAPES[shape]) == params


def test_8b_shards_like_the_hub_at_most_4_gib():
    shards = plan_shards(tensor_specs(SHAPES["llama-3.1-8b"]), 4 * GIB)
    sizes = [sum(2 * int(np.prod(s)) for _, s in shard) for shard in shards]
    assert len(shards) == 4 and max(sizes) <= 4 * GIB
    assert shards[-1][-1][0] == "lm_head.weight"  # untied: the output matrix is written


def test_bf16_rounding_is_round_to_nearest_even_like_torch():
    rng = np.random.default_rng(0)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F807FFF, 0x3F808001,
                     0x7F7FFFFF, 0x00008000, 0x00018000], np.uint32).view(np.float32)
    x = np.concatenate([ties, rng.standard_normal(100_000).astype(np.float32) * 0.02])
    want = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_round_(x.copy()), want)


def test_sharded_checkpoint_reads_back_with_safetensors(sharded):
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    for f in files:  # at most SHARD bytes of data, unless one tensor alone is bigger (the embedding)
        names = [k for k, v in index["weight_map"].items() if v == f]
        assert len(names) == 1 or (sharded / f).stat().st_size <= SHARD + 4096, f
    specs = dict(tensor_specs(SHAPES["test-tiny"]))
    assert set(index["weight_map"]) == set(specs) and set(index["weight_map"].values()) == set(files)
    tensors = _read_all(sharded)
    assert set(tensors) == set(specs)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    for name, t in tensors.items():
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == specs[name], name
        with safe_open(str(sharded / index["weight_map"][name]), framework="pt") as st:
            assert name in st.keys()
        v = t.float()
        if name.endswith("norm.weight"):
            assert bool((v == 1).all()), name
        else:
            assert abs(float(v.mean())) < 0.002 and 0.018 < float(v.std()) < 0.022, name
    assert "lm_head.weight" not in tensors  # tied, like Llama-3.2
    assert not torch.equal(tensors["model.layers.0.mlp.up_proj.weight"],
                           tensors["model.layers.1.mlp.up_proj.weight"])


def test_config_and_marker(sharded):
    cfg = json.loads((sharded / "config.json").read_text())
    s = SHAPES["test-tiny"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]) == \
        (s.hidden, s.layers, s.ffn, s.heads, s.kv_heads, s.head_dim, s.vocab)
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"] is None and cfg["tie_word_embeddings"]
    marker = read_marker(sharded)
    assert marker["params"] == n_params(s) and marker["seed"] == 3
    assert set(marker["files"]) == {p.name for p in sharded.iterdir() if p.name != MARKER}


def test_transformers_loads_it(sharded):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(sharded), dtype=torch.float32)
    st = _read_all(sharded)
    got = dict(model.named_parameters())
    assert torch.equal(got["model.layers.1.self_attn.k_proj.weight"], st["model.layers.1.self_attn.k_proj.weight"].float())
    assert model.config.vocab_size == 512 and model.config.head_dim == 32
    with torch.no_grad():
        logits = model(torch.tensor([[0, 5, 17, 300]])).logits
    assert logits.shape == (1, 4, 512) and bool(torch.isfinite(logits).all())


def test_edgeq_loads_it(sharded):
    ir = load_model(sharded)
    hp, s = ir.hparams, SHAPES["test-tiny"]
    assert (hp.hidden_size, hp.num_layers, hp.intermediate_size, hp.num_heads, hp.num_kv_heads, hp.head_dim,
            hp.vocab_size, hp.tie_word_embeddings) == (s.hidden, s.layers, s.ffn, s.heads, s.kv_heads,
                                                       s.head_dim, s.vocab, True)
    assert hp.rope_theta == 500000.0
    st = _read_all(sharded)
    np.testing.assert_array_equal(ir.linears["blk.1.ffn_down"].weight,
                                  st["model.layers.1.mlp.down_proj.weight"].float().numpy())
    np.testing.assert_array_equal(ir.tensors["token_embd"], st["model.embed_tokens.weight"].float().numpy())
    assert len(ir.tokenizer.tokens) == 384 < hp.vocab_size  # the tokenizer is smaller: GGUF writers pad


def test_deterministic_from_the_seed(tmp_path, sharded):
    again = make_scale(tmp_path / "again", "test-tiny", seed=3, tokenizer="tiny", max_shard_bytes=SHARD)
    assert read_marker(again)["files"] == read_marker(sharded)["files"]
    other = make_scale(tmp_path / "other", "test-tiny", seed=4, tokenizer="tiny", max_shard_bytes=SHARD)
    h_other = read_marker(other)["files"]
    h = read_marker(sharded)["files"]
    assert h_other["config.json"] == h["config.json"]
    assert h_other["model-00001-of-00009.safetensors"] != h["model-00001-of-00009.safetensors"]


def test_single_shard_layers_override_and_rope_scaling(tmp_path):
    out = make_scale(tmp_path / "one", "test-tiny", layers=3, tokenizer="tiny", rope_scaling=True)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert len([k for k in _read_all(out) if k.endswith("q_proj.weight")]) == 3
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["rope_scaling"]["rope_type"] == "llama3"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--shape", "test-tiny", "--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "tokenizer.json" in err[0]
    assert not (tmp_path / "x").exists()
    assert main(["--shape", "test-tiny", "--out", str(tmp_path / "y"), "--tokenizer", "tiny", "--layers", "0"]) == 1
    assert capsys.readouterr().err.startswith("error: --layers")
