"""edgeq.calibrate: Alpaca token sequences and streaming calibration statistics."""
import json
import tracemalloc

import numpy as np
import pytest

from calib_bits import stats_bits

from edgeq.calibrate import (SHARD_SAMPLES, CalibStats, alpaca_token_sequences, calibrate, collect_means,
                             default_data_dir, run_shard, shard_bounds, thread_shards)
from edgeq.errors import EdgeqError
from edgeq.frontend import load_model
from runtimes.reference import ReferenceSession

# fp32 model, float64 accumulation on both sides: only float32 activation rounding differs
STATS_MATCH_MAX_REL = 1e-4  # max |ours - independent| / max |independent|, per statistic
MEMORY_GROWTH_MAX_BYTES = 16 * 1024  # tracemalloc peak, 8 sequences vs 2, beyond their residual streams

N, T = 4, 32


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def tiny(request):
    ir = load_model(request.getfixturevalue(f"tiny_{request.param}"))
    return ir, alpaca_token_sequences(ir.tokenizer, n_samples=N, seq_len=T)


def test_sequences_exact_length_contiguous_deterministic(tiny):
    ir, seqs = tiny
    assert len(seqs) == N and all(len(s) == T for s in seqs)  # no padding, ever
    assert seqs == alpaca_token_sequences(ir.tokenizer, n_samples=N, seq_len=T, seed=0)
    assert seqs != alpaca_token_sequences(ir.tokenizer, n_samples=N, seq_len=T, seed=1)
    # chunks of one stream: 2 x 2T tokens == 4 x T tokens
    longer = alpaca_token_sequences(ir.tokenizer, n_samples=N // 2, seq_len=2 * T)
    assert sum(longer, []) == sum(seqs, [])
    stream = alpaca_token_sequences(ir.tokenizer, n_samples=1, seq_len=4000)[0]
    assert stream.count(ir.tokenizer.eos_id) >= 3  # records are joined, each ending with EOS
    text = ReferenceSession(ir).detokenize(seqs[0])
    assert "### Instruction:" in text or "### Response:" in text or "### Input:" in text


def test_chat_format(tiny):
    ir, _ = tiny
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=2, seq_len=T, fmt="chat")
    assert all(len(s) == T for s in seqs)
    turn = {"gemma3": 4}.get(ir.arch.value, 1)  # <start_of_turn> / <|im_start|>
    assert turn in sum(seqs, [])
    bos = ir.tokenizer.bos_id
    assert not any(a == b == bos for s in seqs for a, b in zip(s, s[1:]))  # one BOS where the template writes one
    with pytest.raises(EdgeqError, match="format"):
        alpaca_token_sequences(ir.tokenizer, n_samples=2, seq_len=T, fmt="nope")


def test_data_location_errors(tiny, tmp_path, monkeypatch):
    ir, _ = tiny
    monkeypatch.setenv("EDGEQ_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(EdgeqError, match="EDGEQ_DATA"):
        alpaca_token_sequences(ir.tokenizer, n_samples=1, seq_len=T)
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_small.json").write_text(json.dumps(
        [{"instruction": "Say hi.", "input": "", "output": "hi"}]))
    with pytest.raises(EdgeqError, match="fewer"):
        alpaca_token_sequences(ir.tokenizer, n_samples=100, seq_len=T)


def _hf_stats(model_dir, seqs):
    """The same statistics with transformers forward hooks (an independent computation)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = m.model.layers
    acc = [dict(zz=0.0, xx=0.0, q=0.0, k=0.0, ang=0.0, oo=0.0, ff=0.0, z=0.0, o=0.0) for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        a = acc[i]

        def f64(t):
            return t.detach()[0].double().numpy()

        def on_q(mod, args, out, a=a):
            x = f64(args[0])
            a["xx"] = a["xx"] + x.T @ x
            a["q"] = a["q"] + (f64(out) ** 2).sum(0)

        def on_k(mod, args, out, a=a):
            a["k"] = a["k"] + (f64(out) ** 2).sum(0)

        def on_o(mod, args, out, a=a):
            o = f64(args[0])
            a["oo"] = a["oo"] + o.T @ o
            a["o"] = a["o"] + o.sum(0)

        def on_gate(mod, args, out, a=a):
            x = f64(args[0])
            a["ff"] = a["ff"] + x.T @ x

        def on_down(mod, args, out, a=a):
            z = f64(args[0])
            a["zz"] = a["zz"] + z.T @ z
            a["z"] = a["z"] + z.sum(0)

        def on_layer(mod, args, kwargs, out, a=a):
            x_in = f64(args[0] if args else kwargs["hidden_states"])[-1]
            x_out = f64(out[0] if isinstance(out, tuple) else out)[-1]
            a["ang"] += 1 - x_in @ x_out / np.linalg.norm(x_in) / np.linalg.norm(x_out)

        hooks += [layer.self_attn.q_proj.register_forward_hook(on_q),
                  layer.self_attn.k_proj.register_forward_hook(on_k),
                  layer.mlp.down_proj.register_forward_hook(on_down),
                  layer.self_attn.o_proj.register_forward_hook(on_o),
                  layer.mlp.gate_proj.register_forward_hook(on_gate),
                  layer.register_forward_hook(on_layer, with_kwargs=True)]
    with torch.no_grad():
        for s in seqs:
            m(torch.tensor([s]))
    for h in hooks:
        h.remove()
    n = len(seqs) * len(seqs[0])
    return [dict(mlp_zz=a["zz"] / n, attn_xx=a["xx"] / n, q_diag=a["q"] / n, k_diag=a["k"] / n,
                 o_xx=a["oo"] / n, ffn_xx=a["ff"] / n, z_mean=a["z"] / n, o_mean=a["o"] / n,
                 angular=a["ang"] / len(seqs)) for a in acc]


def test_stats_match_transformers_hooks(tiny, request):
    ir, seqs = tiny
    stats = calibrate(ir, seqs, progress=False)
    hf = _hf_stats(ir.source["path"], seqs)
    hp = ir.hparams
    for L, ref in zip(stats.layers, hf):
        assert L.n_tokens == N * T
        # HF q_proj/k_proj outputs are (tokens, heads * head_dim), pre-RoPE, biases included
        for name, got, want in (("mlp_zz", L.mlp_zz, ref["mlp_zz"]), ("attn_xx", L.attn_xx, ref["attn_xx"]),
                                ("o_xx", L.o_xx, ref["o_xx"]), ("ffn_xx", L.ffn_xx, ref["ffn_xx"]),
                                ("z_mean", L.z_mean, ref["z_mean"]), ("o_mean", L.o_mean, ref["o_mean"]),
                                ("q_diag", L.q_diag, ref["q_diag"].reshape(hp.num_heads, hp.head_dim)),
                                ("k_diag", L.k_diag, ref["k_diag"].reshape(hp.num_kv_heads, hp.head_dim)),
                                ("angular", np.float64(L.angular), np.float64(ref["angular"]))):
            assert got.shape == want.shape, name
            assert np.abs(got - want).max() <= STATS_MATCH_MAX_REL * np.abs(want).max(), name
        assert 0 < L.angular < 2
    # collect_means: the same means alone (no Gram matrices), bit for bit
    for L, m in zip(stats.layers, collect_means(ir, seqs, progress=False)):
        np.testing.assert_array_equal(L.means().down, m.down)
        np.testing.assert_array_equal(L.means().o, m.o)


def test_memory_does_not_grow_with_samples(tiny_llama):
    ir = load_model(tiny_llama)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=8, seq_len=T)
    peaks, shapes = [], []
    for n in (2, 8):
        calibrate(ir, seqs[:1], progress=False)  # warm caches (tokenizer, imports)
        tracemalloc.start()
        stats = calibrate(ir, seqs[:n], progress=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        shapes.append([(L.mlp_zz.shape, L.attn_xx.shape, L.q_diag.shape, L.k_diag.shape) for L in stats.layers])
        assert stats.n_samples == n and stats.layers[0].n_tokens == n * T
    assert shapes[0] == shapes[1]
    # what grows is the extra samples' residual streams (float32; a shard's inputs and outputs), not the sums
    streams = 2 * (8 - 2) * T * ir.hparams.hidden_size * 4
    assert peaks[1] <= peaks[0] + streams + MEMORY_GROWTH_MAX_BYTES, peaks


def test_save_load_roundtrip_without_pickle(tiny, tmp_path):
    ir, seqs = tiny
    stats = calibrate(ir, seqs[:2], progress=False, source={"data": "alpaca", "seed": 0})
    path = tmp_path / "stats.stats"  # any suffix: written where asked
    stats.save(path)
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    back = CalibStats.load(path)
    assert (back.n_samples, back.seq_len, back.source) == (2, T, stats.source)
    assert back.source["data"] == "alpaca" and back.source["history"] == []
    for a, b in zip(stats.layers, back.layers):
        for name in ("mlp_zz", "attn_xx", "q_diag", "k_diag", "o_xx", "ffn_xx", "z_mean", "o_mean"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert (a.angular, a.n_tokens) == (b.angular, b.n_tokens)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(EdgeqError, match="not an edgeq calibration"):
        CalibStats.load(tmp_path / "other.npz")
    with pytest.raises(EdgeqError, match="not found"):
        CalibStats.load(tmp_path / "missing.npz")


def test_calibrate_rejects_ragged_or_bad_input(tiny):
    ir, seqs = tiny
    with pytest.raises(EdgeqError, match="equal length"):
        calibrate(ir, [seqs[0], seqs[1][:-1]], progress=False)
    with pytest.raises(EdgeqError, match="no calibration"):
        calibrate(ir, [], progress=False)
    with pytest.raises(EdgeqError, match="out of range"):
        calibrate(ir, [[ir.hparams.vocab_size] * 4], progress=False)


@pytest.mark.parametrize("n, block", [(1, 4), (9, 4), (12, 4), (300, 64), (50, 1024)])
def test_gram_accumulation_equals_float64_products(n, block):
    """The covariances are summed with BLAS syrk into lower triangles, mirrored block by block."""
    from edgeq.calibrate import _add_gram, _symmetrize_lower

    rng = np.random.default_rng(n)
    xs = [rng.standard_normal((7, n)).astype(np.float32) for _ in range(3)]
    acc = np.zeros((n, n), order="F")
    for x in xs:
        _add_gram(acc, x)
    _symmetrize_lower(acc, block)
    want = sum(x.astype(np.float64).T @ x.astype(np.float64) for x in xs)
    np.testing.assert_allclose(acc, want, rtol=1e-12, atol=1e-12)
    assert np.array_equal(acc, acc.T)


SHARDED_N = 10  # with shards of 4 samples: 4 + 4 + 2
SUM_ORDER_MAX_REL = 1e-12  # float64 sums of the same terms in another order (max |diff| / max |value|)


def test_shard_boundaries_depend_on_the_samples_only():
    assert shard_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_bounds(3, 4) == [(0, 3)]
    assert shard_bounds(64) == [(a, a + SHARD_SAMPLES) for a in range(0, 64, SHARD_SAMPLES)]
    with pytest.raises(EdgeqError, match="at least one sample"):
        shard_bounds(4, 0)


def test_sharded_statistics_are_the_same_bits_for_any_number_of_workers(tiny):
    """Sums per fixed shard, added in shard order: 1 (the sequential build), 2 or 3 worker threads
    give the same bits; collect_means the same means; and the shards change only the float64
    summation order against one sum over every sample."""
    ir, _ = tiny
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=SHARDED_N, seq_len=T)
    one = calibrate(ir, seqs, progress=False, workers=1, shard_samples=4)
    want = stats_bits(one)
    for workers in (2, 3):
        assert stats_bits(calibrate(ir, seqs, progress=False, workers=workers, shard_samples=4)) == want, workers
    for workers in (1, 3):
        for L, m in zip(one.layers, collect_means(ir, seqs, progress=False, workers=workers, shard_samples=4)):
            assert L.means().down.tobytes() == m.down.tobytes() and L.means().o.tobytes() == m.o.tobytes()
    whole = calibrate(ir, seqs, progress=False, shard_samples=SHARDED_N)  # one shard: the unsharded sums
    for a, b in zip(one.layers, whole.layers):
        assert a.n_tokens == b.n_tokens == SHARDED_N * T
        for name in ("mlp_zz", "attn_xx", "q_diag", "k_diag", "o_xx", "ffn_xx", "z_mean", "o_mean"):
            x, y = getattr(a, name), getattr(b, name)
            assert np.abs(x - y).max() <= SUM_ORDER_MAX_REL * np.abs(y).max(), name
        assert a.angular == pytest.approx(b.angular, rel=SUM_ORDER_MAX_REL)


def test_shards_computed_in_any_order_give_the_same_bits(tiny_llama):
    """A runner that computes a layer's shards last to first (each from zero, with its own KV
    buffer) and hands them over in shard order: the same statistics as the threads' runner."""
    ir = load_model(tiny_llama)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=SHARDED_N, seq_len=T)

    def backwards(hp, layer, kind, n, inputs):
        done = {k: run_shard(hp, layer, kind, inputs(k)) for k in reversed(range(n))}
        return (done[k] for k in range(n))

    want = stats_bits(calibrate(ir, seqs, progress=False, runner=thread_shards(1), shard_samples=4))
    assert stats_bits(calibrate(ir, seqs, progress=False, runner=backwards, shard_samples=4)) == want


def test_a_runner_that_loses_shards_is_an_error(tiny_llama):
    ir = load_model(tiny_llama)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=SHARDED_N, seq_len=T)

    def short(hp, layer, kind, n, inputs):
        return (run_shard(hp, layer, kind, inputs(k)) for k in range(n - 1))

    with pytest.raises(EdgeqError, match="layer 0: 2 shard results for 3 shards"):
        calibrate(ir, seqs, progress=False, runner=short, shard_samples=4)
