"""ONNX lowering: graph checks, logits vs the reference runtime, KV cache, sorted RoPE, determinism."""
import numpy as np
import pytest

import onnx
import onnxruntime  # noqa: F401

from edgeq.artifact import write_manifest  # noqa: E402
from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.frontend import load_model  # noqa: E402
from edgeq.ir import Role  # noqa: E402
from edgeq.backends.onnx import lower as lo  # noqa: E402
from runtimes.onnxrt import OnnxSession  # noqa: E402
from runtimes.reference import ReferenceSession  # noqa: E402

FLOAT = dict(linear=None, head=None)
INT4 = dict(linear="int4_g32_sym", head="int8_g32_sym")
INT8 = dict(linear="int8_g32_sym", head="int8_g32_sym")


def _write(ir, out, **kw):
    out.mkdir(parents=True)
    opts = lo.OnnxOptions(**kw)
    info = lo.write_onnx(ir, out, opts)
    write_manifest(out, {"format": "onnx", "onnx": info, "hparams": ir.hparams.to_json()})
    return opts


def _ids(ir, n=24, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, ir.hparams.vocab_size, n)]


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _mean_kl(ref_logits, logits):
    p, q = _log_softmax(ref_logits.astype(np.float64)), _log_softmax(logits.astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("attention", ["gqa", "standard"])
@pytest.mark.parametrize("weights", ["float", "int4", "int8"])
def test_logits_match_reference_runtime(tiny_model, tmp_path, attention, weights):
    """accuracy_level 1 (fp32 activations): the graph computes exactly the dequantized model."""
    ir = load_model(tiny_model)
    kw = {"float": FLOAT, "int4": INT4, "int8": INT8}[weights]
    opts = _write(ir, tmp_path / "a", attention=attention, accuracy_level=1, **kw)
    ids = _ids(ir)
    got = OnnxSession(tmp_path / "a").logits(ids)
    want = ReferenceSession(lo.lowered_ir(ir, opts), dtype=np.float64).logits(ids)
    assert got.shape == (len(ids), ir.hparams.vocab_size)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    if weights != "float":  # and the dequantized model really is quantized
        assert not np.allclose(lo.lowered_ir(ir, opts).linear(0, Role.Q).weight, ir.linear(0, Role.Q).weight)


def test_int8_activation_path_stays_close(tiny_model, tmp_path):
    """accuracy_level 4 quantizes activations to int8 inside MatMulNBits: close, not exact."""
    ir = load_model(tiny_model)
    opts = _write(ir, tmp_path / "a", accuracy_level=4, **INT8)
    ids = _ids(ir)
    got = OnnxSession(tmp_path / "a").logits(ids)
    want = ReferenceSession(lo.lowered_ir(ir, opts), dtype=np.float64).logits(ids)
    assert _mean_kl(want, got) < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_kv_cache_decode_equals_full_recompute(tiny_model, tmp_path, attention):
    ir = load_model(tiny_model)
    _write(ir, tmp_path / "a", attention=attention, **INT4)
    s = OnnxSession(tmp_path / "a")
    ids = _ids(ir, 20)
    full = s.logits(ids)
    s.reset()
    parts = [s._run(ids[:9], True), s._run(ids[9:14], True)] + [s._run([t], True) for t in ids[14:]]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=1e-4 * np.abs(full).max())
    # generation: prompt logits at the last position only, then one token at a time
    last = s._start(ids[:9])
    np.testing.assert_allclose(last, full[8], rtol=0, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_sorted_rope_pairs_are_lowered_exactly(tiny_llama, tmp_path, attention):
    """A Q/K pair sort (rope_index): gathered frequencies (standard) or the sort undone (gqa)."""
    from edgeq.passes.naive_sort import naive_sort

    ir = naive_sort(load_model(tiny_llama))
    assert ir.rope_index and any(not np.array_equal(v[0], np.arange(v.shape[1])) for v in ir.rope_index.values())
    _write(ir, tmp_path / "a", attention=attention, accuracy_level=1, **FLOAT)
    ids = _ids(ir)
    want = ReferenceSession(ir, dtype=np.float64).logits(ids)
    got = OnnxSession(tmp_path / "a").logits(ids)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_graph_structure(tiny_llama, tmp_path):
    ir = load_model(tiny_llama)
    _write(ir, tmp_path / "a", **INT4)
    path = tmp_path / "a" / lo.MODEL_FILE
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path), load_external_data=False)
    assert {o.domain or "": o.version for o in m.opset_import}[""] >= 17
    nodes = list(m.graph.node)
    mnb = [n for n in nodes if n.op_type == "MatMulNBits"]
    L = ir.hparams.num_layers
    assert len(mnb) == 4 * L + 1  # packed Q|K|V, O, packed gate|up, down per layer + the head (tied or not)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mnb[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
    assert sum(n.op_type == "GroupQueryAttention" for n in nodes) == L
    names = [i.name for i in m.graph.input]
    assert names[:2] == ["input_ids", "logits_from"] and f"past.{L - 1}.value" in names
    assert [o.name for o in m.graph.output][0] == "present.0.key" and "logits" in [o.name for o in m.graph.output]
    # weights live in one external file, large tensors page aligned
    locs = set()
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            d = {e.key: e.value for e in t.external_data}
            locs.add(d["location"])
            if int(d["length"]) >= 65536:
                assert int(d["offset"]) % 4096 == 0
    assert locs == {lo.DATA_FILE}


def test_tied_embedding_is_one_initializer(tiny_qwen2, tmp_path):
    ir = load_model(tiny_qwen2)
    assert ir.hparams.tie_word_embeddings
    _write(ir, tmp_path / "a", **INT4)
    m = onnx.load(str(tmp_path / "a" / lo.MODEL_FILE), load_external_data=False)
    users = [n.op_type for n in m.graph.node if "token_embd.qweight" in n.input]
    assert sorted(users) == ["Gather", "MatMulNBits"]
    assert sum("token_embd" in t.name and t.name.endswith("qweight") for t in m.graph.initializer) == 1


def test_lowering_is_deterministic(tiny_qwen2, tmp_path):
    ir = load_model(tiny_qwen2)
    for d in ("a", "b"):
        _write(ir, tmp_path / d, **INT4)
    for f in (lo.MODEL_FILE, lo.DATA_FILE, lo.TOKENIZER_FILE):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_refuses_what_it_cannot_express(tiny_llama, tmp_path):
    ir = load_model(tiny_llama)
    with pytest.raises(EdgeqError, match="8-bit or float32"):
        lo.build_model(ir, lo.OnnxOptions(linear="int4_g32_sym", head="int4_g32_sym"))
    with pytest.raises(EdgeqError, match="attention"):
        lo.OnnxOptions(attention="flash")


# ---- pruning rates in one graph ------------------------------------------------------------------
RATES = (0.0, 0.15, 0.25, 0.35)


def _pruned(model_dir, lora=None):
    """Naive-sorted (non-identity RoPE pair order) tiny model carrying RATES, layers pruned unevenly."""
    from edgeq.frontend import load_adapter
    from edgeq.passes.naive_sort import naive_sort
    from edgeq.passes.rate_plan import apply_prune_spec, plan_rates

    ir = load_model(model_dir)
    ir = naive_sort(load_adapter(ir, lora) if lora else ir)
    return apply_prune_spec(ir, plan_rates(ir, RATES, granularity=32, importance=np.array([0.1, 0.3])))


@pytest.mark.parametrize("ffn_rates", lo.FFN_RATES)
@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_multi_rate_graph_matches_reference_at_every_rate(tiny_model, tmp_path, attention, ffn_rates):
    ir = _pruned(tiny_model)
    opts = _write(ir, tmp_path / "a", attention=attention, accuracy_level=1, ffn_rates=ffn_rates, **INT4)
    s = OnnxSession(tmp_path / "a")
    ref = ReferenceSession(lo.lowered_ir(ir, opts), dtype=np.float64)
    assert s.prune_rates == RATES
    ids = _ids(ir)
    got = {}
    for r in RATES:
        s.set_prune_rate(r)
        ref.set_prune_rate(r)
        got[r], want = s.logits(ids), ref.logits(ids)
        assert np.abs(got[r] - want).max() <= 1e-4 * np.abs(want).max(), r
    assert all(np.abs(got[r] - got[0.0]).max() > 1e-2 for r in RATES[1:])  # each rate really prunes


@pytest.mark.parametrize("ffn_rates", lo.FFN_RATES)
def test_multi_rate_graph_with_separate_lora_branches(tiny_llama, tiny_llama_lora, tmp_path, ffn_rates):
    """LoRA branches kept separate: masked with the MLP channels, or split with the MLP segments
    (sliced adapter inputs)."""
    ir = _pruned(tiny_llama, tiny_llama_lora)
    out = tmp_path / "a"
    out.mkdir()
    opts = lo.OnnxOptions(accuracy_level=1, ffn_rates=ffn_rates, **INT4)
    info = lo.write_onnx(ir, out, opts, switchable=tuple(ir.adapters))
    (name,) = ir.adapters
    lo.write_adapter(ir, name, out / "a.onnx_adapter", opts)
    info["adapter_files"] = {name: "a.onnx_adapter"}
    write_manifest(out, {"format": "onnx", "onnx": info, "hparams": ir.hparams.to_json()})
    s = OnnxSession(out)
    ref = ReferenceSession(lo.lowered_ir(ir, opts), dtype=np.float64)
    base = ReferenceSession(lo.lowered_ir(ir.without_low_rank(), opts), dtype=np.float64)
    ids = _ids(ir)
    for r in (0.0, 0.35):
        for active, oracle in ((name, ref), (None, base)):
            s.set_adapter(active)
            s.set_prune_rate(r)
            oracle.set_prune_rate(r)
            want = oracle.logits(ids)
            assert np.abs(s.logits(ids) - want).max() <= 1e-4 * np.abs(want).max(), (r, active)


@pytest.mark.parametrize("ffn_rates", lo.FFN_RATES)
@pytest.mark.parametrize("kv", ["keep", "recompute"])
def test_rate_switch_mid_context_follows_the_reference(tiny_llama, tmp_path, kv, ffn_rates):
    """Switching rates while a context is cached: the KV cache policy of the reference runtime."""
    ir = _pruned(tiny_llama)
    opts = _write(ir, tmp_path / "a", accuracy_level=1, ffn_rates=ffn_rates, **INT4)
    s = OnnxSession(tmp_path / "a")
    ref = ReferenceSession(lo.lowered_ir(ir, opts), dtype=np.float64)
    ids = _ids(ir, 20)
    for sess in (s, ref):
        sess.set_prune_rate(0.0)
    got, want = [s._start(ids[:8])], [ref._start(ids[:8])]
    for j, (rate, t) in enumerate(zip((0.35, 0.35, 0.15, 0.0, 0.25, 0.35), ids[8:])):
        for sess in (s, ref):
            sess.set_prune_rate(rate, kv=kv)
        got.append(s._step(t))
        want.append(ref._step(t))
    got, want = np.stack(got), np.stack(want)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    with pytest.raises(EdgeqError, match="not carried"):
        s.set_prune_rate(0.5)
    with pytest.raises(EdgeqError, match="kv policy"):
        s.set_prune_rate(0.15, kv="drop")


def _walk(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _walk(a.g)


def test_rates_share_one_copy_of_the_weights(tiny_llama, tmp_path):
    """Segmented MLP: every weight is stored once and read by exactly one MatMulNBits node (so
    onnxruntime prepacks it once): the 4-rate graph holds the bytes of the 1-rate one, and a
    rate's run skips the MLP segments it prunes."""
    from collections import Counter

    ir = _pruned(tiny_llama)
    _write(ir, tmp_path / "multi", ffn_rates="segments", **INT4)
    _write(ir.replace(prune=None), tmp_path / "one", **INT4)
    m = onnx.load(str(tmp_path / "multi" / lo.MODEL_FILE), load_external_data=False)
    readers = Counter(n.input[1] for n in _walk(m.graph) if n.op_type == "MatMulNBits")
    assert readers and set(readers.values()) == {1}
    n_if = sum(n.op_type == "If" for n in m.graph.node)
    assert n_if == sum(len(lo.ffn_segments(ir, i)) - 1 for i in range(ir.hparams.num_layers)) > 0
    assert [i.name for i in m.graph.input][2] == lo.RATE_INPUT

    def weight_bytes(d):  # the MatMulNBits codes and scales
        g = onnx.load(str(tmp_path / d / lo.MODEL_FILE), load_external_data=False).graph
        return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                   for t in g.initializer if t.name.endswith((".qweight", ".scales")))

    assert weight_bytes("multi") == weight_bytes("one") > 0
    size = {d: (tmp_path / d / lo.DATA_FILE).stat().st_size for d in ("multi", "one")}
    assert size["multi"] <= 1.05 * size["one"]  # + the per-rate mask tables
    s = OnnxSession(tmp_path / "multi")
    per_rate = [s.resident_weight_bytes(r) for r in RATES]
    assert all(a > b for a, b in zip(per_rate, per_rate[1:]))


def test_masked_mlp_makes_the_calls_of_one_rate(tiny_llama, tmp_path):
    """``ffn_rates="mask"`` (the default): the 4-rate graph makes exactly the MatMulNBits calls of
    the 1-rate graph, on the same (identical) weights, each read by one node; no control flow;
    the MLP's pruned channels are zeroed by one per-rate mask per layer, so every rate reads
    every weight."""
    from collections import Counter

    ir = _pruned(tiny_llama)
    assert lo.OnnxOptions().ffn_rates == "mask"
    _write(ir, tmp_path / "multi", **INT4)
    _write(ir.replace(prune=None), tmp_path / "one", **INT4)
    g = {d: onnx.load(str(tmp_path / d / lo.MODEL_FILE), load_external_data=False).graph for d in ("multi", "one")}

    def matmuls(graph):
        return sorted((n.name, tuple(n.input[1:3]), tuple((a.name, a.i) for a in n.attribute))
                      for n in _walk(graph) if n.op_type == "MatMulNBits")

    assert matmuls(g["multi"]) == matmuls(g["one"])
    assert Counter(n.input[1] for n in _walk(g["multi"]) if n.op_type == "MatMulNBits").most_common(1)[0][1] == 1
    assert not any(n.op_type == "If" for n in _walk(g["multi"]))
    masks = [n for n in g["multi"].node if n.name.endswith("ffn_rate_mask")]
    F = ir.hparams.intermediate_size
    assert len(masks) == sum(any(ir.prune.widths[r][i].ffn < F for r in RATES) for i in range(ir.hparams.num_layers)) > 0
    q = {d: {t.name: (tuple(t.dims), t.external_data) for t in g[d].initializer if t.name.endswith((".qweight", ".scales"))}
         for d in g}
    assert q["multi"].keys() == q["one"].keys() and q["one"]
    data = {d: (tmp_path / d / lo.DATA_FILE).read_bytes() for d in g}

    def payload(d, name):
        ext = dict((e.key, e.value) for e in q[d][name][1])
        return data[d][int(ext["offset"]):int(ext["offset"]) + int(ext["length"])] if ext else None

    assert all(payload("multi", n) == payload("one", n) for n in q["one"])
    s = OnnxSession(tmp_path / "multi")
    per_rate = [s.resident_weight_bytes(r) for r in RATES]
    assert len(set(per_rate)) == 1  # honest: no rate skips MLP weights in this form


def _synthetic_ir(layers=6, hidden=512, ffn=2048, heads=8, kv=2, vocab=512, seed=0):
    """A random Llama-shaped ModelIR with tens of MB of weights (no tokenizer, no checkpoint)."""
    from edgeq.ir import Arch, HParams, Linear, ModelIR, linear_name
    from edgeq.passes.rate_plan import apply_prune_spec, plan_rates

    hp = HParams(arch=Arch.LLAMA, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers,
                 num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads, rope_theta=10000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=2048, tie_word_embeddings=True, attention_bias=False)
    rng = np.random.default_rng(seed)
    shapes = ModelIR(hparams=hp, linears={}, tensors={}, tokenizer=None).expected_shapes()
    linears = {}
    for i in range(layers):
        for role in lo.ROLES:
            name = linear_name(i, role)
            linears[name] = Linear(name=name, role=role, layer=i,
                                   weight=(rng.standard_normal(shapes[name]) * 0.05).astype(np.float32))
    tensors = {"token_embd": (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float32),
               "output_norm": np.ones(hidden, np.float32)}
    for i in range(layers):
        tensors[f"blk.{i}.attn_norm"] = np.ones(hidden, np.float32)
        tensors[f"blk.{i}.ffn_norm"] = np.ones(hidden, np.float32)
    ir = ModelIR(hparams=hp, linears=linears, tensors=tensors, tokenizer=None)
    return apply_prune_spec(ir, plan_rates(ir, RATES, granularity=32, mode="uniform"))


RSS_CODE = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from runtimes.onnxrt import OnnxSession
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
s = OnnxSession({path!r}, threads=1)
for r in s.prune_rates:
    s.set_prune_rate(r)
    s.logits(list(range(1, 17)))
print(rss() - before)
"""


def test_four_rates_cost_the_memory_of_one(tmp_path):
    """onnxruntime process memory of a session that has run all four rates vs a session of the
    same weights carrying one rate (each measured in a fresh process, best of two)."""
    import subprocess
    import sys
    from pathlib import Path

    ir = _synthetic_ir()
    _write(ir, tmp_path / "multi", **INT4)
    _write(ir.replace(prune=None), tmp_path / "one", **INT4)
    weights = (tmp_path / "one" / lo.DATA_FILE).stat().st_size
    repo = str(Path(__file__).resolve().parents[2])
    cost = {}
    for d in ("one", "multi"):
        runs = [int(subprocess.run([sys.executable, "-c", RSS_CODE.format(repo=repo, path=str(tmp_path / d))],
                                   capture_output=True, text=True, check=True).stdout.split()[-1]) for _ in range(2)]
        cost[d] = min(runs)
    assert cost["one"] >= 0.8 * weights  # the measurement sees the weights at all
    assert cost["multi"] < 1.1 * cost["one"], (cost, weights)


def test_big_untied_head_is_split_into_row_blocks_with_the_same_logits(tiny_llama, tmp_path, monkeypatch):
    """An untied head over HEAD_CALL_MAX_BYTES (float32) becomes one MatMulNBits per block of
    vocabulary rows + a Concat (onnxruntime without prepacking dequantizes one call's weight at a
    time); the logits are those of the one-call graph (to float32 rounding: the kernels block the
    rows differently), with and without prepacking."""
    from edgeq.backends.onnx import decoder

    ir = load_model(tiny_llama)
    assert not ir.hparams.tie_word_embeddings
    _write(ir, tmp_path / "one", **INT4)
    v, h = ir.tensors["output"].shape
    monkeypatch.setattr(decoder, "HEAD_CALL_MAX_BYTES", 4 * h * (v // 3 + 1))
    _write(ir, tmp_path / "split", **INT4)
    m = onnx.load(str(tmp_path / "split" / lo.MODEL_FILE), load_external_data=False)
    heads = [n for n in m.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("output.")]
    assert len(heads) == 3 and [n.op_type for n in m.graph.node if n.name == "output.concat"] == ["Concat"]
    assert sum(dict((a.name, a.i) for a in n.attribute)["N"] for n in heads) == v
    ids = _ids(ir)
    for prepack in (True, False):
        one = OnnxSession(tmp_path / "one", prepack=prepack).logits(ids)
        split = OnnxSession(tmp_path / "split", prepack=prepack).logits(ids)
        assert np.abs(one - split).max() <= 1e-5 * np.abs(one).max(), prepack
        assert (one.argmax(-1) == split.argmax(-1)).all()
