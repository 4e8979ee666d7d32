"""The streaming ONNX, TVM and reference writers: a model loaded lazily and written in small row
chunks gives the same bytes as the same model held in memory and written whole, and what is
written is what the whole-tensor encoders make (onnxruntime / safetensors as readers)."""
from __future__ import annotations

import dataclasses
import hashlib
import platform

import numpy as np
import pytest

from edgeq import streaming
from edgeq.frontend import load_adapter, load_model
from edgeq.lazy import is_lazy

SMALL, WHOLE = 64 * 3, 1 << 30  # values per chunk: a few rows of the tiny model / everything at once


def _eager(ir):
    """``ir`` with every lazy array read into memory."""
    def arr(x):
        return np.asarray(x) if is_lazy(x) else x

    lins = {k: dataclasses.replace(v, weight=arr(v.weight), low_rank=tuple(
        dataclasses.replace(lr, a=arr(lr.a), b=arr(lr.b)) for lr in v.low_rank)) for k, v in ir.linears.items()}
    return ir.replace(linears=lins, tensors={k: arr(v) for k, v in ir.tensors.items()})


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _pruned(model_dir, lora=None):
    from edgeq.passes.naive_sort import naive_sort
    from edgeq.passes.rate_plan import apply_prune_spec, plan_rates

    ir = load_model(model_dir)
    ir = naive_sort(load_adapter(ir, lora) if lora else ir)
    return apply_prune_spec(ir, plan_rates(ir, (0.0, 0.25, 0.5), granularity=32, importance=np.array([0.1, 0.3])))


def _both(write, ir, tmp_path, monkeypatch, files):
    """Write ``ir`` as loaded in small chunks and ``_eager(ir)`` whole; assert the files are equal."""
    (tmp_path / "lazy").mkdir()
    (tmp_path / "eager").mkdir()
    monkeypatch.setattr(streaming, "STREAM_CHUNK_VALUES", SMALL)
    a = write(ir, tmp_path / "lazy")
    monkeypatch.setattr(streaming, "STREAM_CHUNK_VALUES", WHOLE)
    b = write(_eager(ir), tmp_path / "eager")
    for f in files:
        assert _sha(tmp_path / "lazy" / f) == _sha(tmp_path / "eager" / f), f
    assert a == b
    return tmp_path / "lazy"


# ---- ONNX -----------------------------------------------------------------------------------------
ONNX_WEIGHTS = {"int4": dict(linear="int4_g32_sym", head="int8_g32_sym"),
                "int8asym": dict(linear="int8_g32_asym", head="int8_g32_sym"),
                "int4asym": dict(linear="int4_g32_asym", head="int8_g32_sym"),
                "float": dict(linear=None, head=None)}


@pytest.mark.parametrize("weights", list(ONNX_WEIGHTS))
def test_onnx_lazy_chunked_equals_eager_whole(tiny_model, tmp_path, monkeypatch, weights):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from edgeq.backends.onnx import lower as lo
    from runtimes.reference import ReferenceSession

    ir = load_model(tiny_model)
    assert all(is_lazy(lin.weight) for lin in ir.linears.values())
    opts = lo.OnnxOptions(accuracy_level=1, **ONNX_WEIGHTS[weights])
    out = _both(lambda m, d: lo.write_onnx(m, d, opts), ir, tmp_path, monkeypatch, [lo.MODEL_FILE, lo.DATA_FILE])
    onnx.checker.check_model(str(out / lo.MODEL_FILE))
    # onnxruntime computes the dequantized model (asymmetric zero points included)
    sess = ort.InferenceSession(str(out / lo.MODEL_FILE), providers=["CPUExecutionProvider"])
    hp = ir.hparams
    ids = np.random.default_rng(0).integers(0, hp.vocab_size, (1, 12)).astype(np.int64)
    feed = {"input_ids": ids, "logits_from": np.array(0, np.int64)}
    for i in range(hp.num_layers):
        for kv in ("key", "value"):
            feed[f"past.{i}.{kv}"] = np.zeros((1, hp.num_kv_heads, 0, hp.head_dim), np.float32)
    got = sess.run(["logits"], feed)[0][0]
    want = ReferenceSession(lo.lowered_ir(ir, opts), dtype=np.float64).logits([int(t) for t in ids[0]])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_onnx_multi_rate_graph_with_branches_chunked_equals_whole(tiny_llama, tiny_llama_lora, tmp_path,
                                                                  monkeypatch, attention):
    """MLP channel segments (row and column slices), stacked Q/K/V, LoRA branches (one kept
    separate as overridable inputs) and the restored RoPE order, chunked or not."""
    pytest.importorskip("onnx")
    from edgeq.backends.onnx import lower as lo

    ir = _pruned(tiny_llama, tiny_llama_lora)
    assert any(lin.low_rank for lin in ir.linears.values())
    opts = lo.OnnxOptions(attention=attention)
    _both(lambda m, d: lo.write_onnx(m, d, opts), ir, tmp_path, monkeypatch, [lo.MODEL_FILE, lo.DATA_FILE])


def test_onnx_deferred_weights_are_the_whole_tensor_encodings(tiny_qwen2, tmp_path, monkeypatch):
    """Each initializer in model.onnx.data (read back through onnx's external-data loader) is
    exactly the whole-tensor MatMulNBits encoding / transposed float weight."""
    pytest.importorskip("onnx")
    import onnx
    from onnx import numpy_helper

    from edgeq.ir import Role
    from edgeq.backends.onnx import lower as lo
    from edgeq.quant.intgroup import rtn_int

    ir = load_model(tiny_qwen2)
    monkeypatch.setattr(streaming, "STREAM_CHUNK_VALUES", SMALL)
    for kw, tag in ((dict(linear="int4_g32_asym", head="int8_g32_sym"), "q"), (dict(linear=None, head=None), "f")):
        out = tmp_path / tag
        out.mkdir()
        lo.write_onnx(ir, out, lo.OnnxOptions(**kw))
        m = onnx.load(str(out / lo.MODEL_FILE))  # loads the external data
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        o = ir.linear(1, Role.O)
        if tag == "f":
            np.testing.assert_array_equal(inits[f"{o.name}.weight_t"], np.asarray(o.weight).T)
            np.testing.assert_array_equal(inits["token_embd.weight"], np.asarray(ir.tensors["token_embd"]))
            continue
        want = rtn_int(np.asarray(o.weight), "int4_g32_asym").to_matmulnbits()
        np.testing.assert_array_equal(inits[f"{o.name}.qweight"], want["B"])
        np.testing.assert_array_equal(inits[f"{o.name}.scales"].reshape(-1), want["scales"])
        np.testing.assert_array_equal(inits[f"{o.name}.zero_points"], want["zero_points"])
        emb = rtn_int(np.asarray(ir.tensors["token_embd"]), "int8_g32_sym").to_matmulnbits()
        np.testing.assert_array_equal(inits["token_embd.qweight"], emb["B"])


# ---- TVM ------------------------------------------------------------------------------------------
@pytest.mark.skipif(platform.machine() != "x86_64", reason="artifacts built for an x86 profile")
def test_tvm_lazy_chunked_equals_eager_whole(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    from safetensors.numpy import load_file

    from edgeq.kernels.compile import kernel_block
    from edgeq.backends.tvm import lower as lt

    ir = load_model(tiny_model)
    opts = lt.TvmOptions(bits=4, group=32, target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    out = _both(lambda m, d: lt.write_tvm(m, d, opts), ir, tmp_path, monkeypatch, [lt.WEIGHTS])
    got = load_file(str(out / lt.WEIGHTS))
    block = kernel_block(opts.target)
    whole, _ = lt._pack(np.asarray(ir.tensors["token_embd"]), None, 8, 32, block)  # the head, packed whole
    for k, v in whole.items():
        np.testing.assert_array_equal(got[f"token_embd.{k}"], v)
    (w, lr), = lt.matmul_groups(_eager(ir), 1, block, ("gate_up",)).values()
    for k, v in lt._pack(w, lr, 4, 32, block, opts.lr_dtype)[0].items():
        np.testing.assert_array_equal(got[f"blk.1.gate_up.{k}"], v)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="artifacts built for an x86 profile")
def test_tvm_pruned_with_branches_chunked_equals_whole(tiny_llama, tiny_llama_lora, tmp_path, monkeypatch):
    pytest.importorskip("tvm")
    from edgeq.backends.tvm import lower as lt

    ir = _pruned(tiny_llama, tiny_llama_lora)
    opts = lt.TvmOptions(bits=8, group=32, target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    _both(lambda m, d: lt.write_tvm(m, d, opts), ir, tmp_path, monkeypatch, [lt.WEIGHTS])


# ---- reference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pruned", [False, True])
def test_reference_ir_lazy_chunked_equals_eager_whole(tiny_model, tiny_llama_lora, tiny_llama, tmp_path,
                                                      monkeypatch, pruned):
    from safetensors.numpy import save_file

    from edgeq.backends.reference.ir_files import META, WEIGHTS, read_ir, write_ir

    ir = _pruned(tiny_llama, tiny_llama_lora) if pruned else load_model(tiny_model)
    out = _both(lambda m, d: write_ir(m, d), ir, tmp_path, monkeypatch, [WEIGHTS, META])
    # the bytes safetensors' own writer makes of the same arrays in the runtime's layout (format 2),
    # and read_ir gives the model back
    from edgeq.ir import Role
    from runtimes.reference import to_runtime_layout

    e = _eager(ir)
    hp = e.hparams

    def lay(lin, kind, a):
        return to_runtime_layout(hp, lin.role, kind, a)

    arrays = {f"{n}.weight" + ("_t" if lin.role in (Role.O, Role.DOWN) else ""): lay(lin, "weight", lin.weight)
              for n, lin in e.linears.items()}
    arrays.update({f"{n}.bias": lay(lin, "bias", lin.bias) for n, lin in e.linears.items() if lin.bias is not None})
    for n, lin in e.linears.items():
        for k, lr in enumerate(lin.low_rank):
            arrays.update({f"{n}.lr{k}.a": lay(lin, "a", lr.a), f"{n}.lr{k}.b": lay(lin, "b", lr.b)})
    arrays.update({f"tensor.{n}": t for n, t in e.tensors.items()})
    arrays.update({f"rope_index.{i}": np.asarray(v, np.int64) for i, v in e.rope_index.items()})
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp_path / "ref.safetensors"))
    assert (out / WEIGHTS).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    back = read_ir(out)
    for n, lin in e.linears.items():
        np.testing.assert_array_equal(np.asarray(back.linears[n].weight), lin.weight)
        if lin.bias is not None:
            np.testing.assert_array_equal(back.linears[n].bias, lin.bias)
        for lr, lr2 in zip(lin.low_rank, back.linears[n].low_rank, strict=True):
            np.testing.assert_array_equal(lr2.a, lr.a)
            np.testing.assert_array_equal(lr2.b, lr.b)


# ---- memory ---------------------------------------------------------------------------------------
def _random_checkpoint(src, out, layers, hidden=256, ffn=1024, heads=4, kv=2, head_dim=64, seed=0):
    """A float16 checkpoint with the tiny Llama's tokenizer and ``layers`` wider layers."""
    import json
    import shutil

    from safetensors.numpy import save_file

    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
               num_key_value_heads=kv, head_dim=head_dim)
    (out / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)

    V = cfg["vocab_size"]
    t = {"model.embed_tokens.weight": w(V, hidden), "lm_head.weight": w(V, hidden),
         "model.norm.weight": np.ones(hidden, np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(hidden, np.float16),
                  p + "post_attention_layernorm.weight": np.ones(hidden, np.float16),
                  p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
                  p + "self_attn.k_proj.weight": w(kv * head_dim, hidden),
                  p + "self_attn.v_proj.weight": w(kv * head_dim, hidden),
                  p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
                  p + "mlp.gate_proj.weight": w(ffn, hidden), p + "mlp.up_proj.weight": w(ffn, hidden),
                  p + "mlp.down_proj.weight": w(hidden, ffn)})
    save_file(t, str(out / "model.safetensors"))
    return out


def _writers():
    from edgeq.backends.onnx import lower as lo
    from edgeq.backends.reference.ir_files import write_ir

    out = {"onnx-int4": lambda m, d: lo.write_onnx(m, d, lo.OnnxOptions()),
           "onnx-f32": lambda m, d: lo.write_onnx(m, d, lo.OnnxOptions(linear=None, head=None)),
           "reference": write_ir}
    if platform.machine() == "x86_64":
        from edgeq.backends.tvm import lower as lt

        opts = lt.TvmOptions(bits=4, group=32, target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
        out["tvm"] = lambda m, d: lt.write_tvm(m, d, opts)
    return out


@pytest.mark.parametrize("fmt", ["onnx-int4", "onnx-f32", "reference", "tvm"])
def test_peak_memory_of_writing_does_not_grow_with_depth(tiny_llama, tmp_path, monkeypatch, fmt):
    """Peak numpy memory (tracemalloc) while writing a lazily loaded model: the same at 2 and
    at 8 layers, and far below the model's float32 size (one tensor / one row chunk at a time)."""
    pytest.importorskip("tvm" if fmt == "tvm" else "onnx")
    import tracemalloc

    if fmt not in _writers():
        pytest.skip("tvm artifacts built for an x86 profile")
    write = _writers()[fmt]
    monkeypatch.setattr(streaming, "STREAM_CHUNK_VALUES", 1 << 16)
    peaks, sizes = {}, {}
    for layers in (2, 8):
        ir = load_model(_random_checkpoint(tiny_llama, tmp_path / f"m{layers}", layers))
        sizes[layers] = sum(lin.weight.size for lin in ir.linears.values()) * 4
        (tmp_path / f"warm{layers}").mkdir()
        write(ir, tmp_path / f"warm{layers}")  # imports and caches outside the measurement
        (tmp_path / f"o{layers}").mkdir()
        tracemalloc.start()
        try:
            write(ir, tmp_path / f"o{layers}")
            peaks[layers] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert sizes[8] > 3.9 * sizes[2]
    assert peaks[8] < 1.2 * peaks[2] + (1 << 20), (peaks, sizes)
    assert peaks[8] < sizes[8] / 4, (peaks, sizes)
