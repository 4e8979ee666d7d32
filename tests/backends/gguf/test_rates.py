"""GGUF at a rate: one llama.cpp file per pruning rate (edgeq.backends.gguf.rates).

The tiny models get a random RoPE-pair order per KV group (an exact reparametrisation, as the
UniQL sort produces) and a hand-made PruneSpec that prunes MLP, Q/K pairs and V/O components;
every per-rate file is checked in llama.cpp against the numpy reference on the
GGUF-expressible plan."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gguf

from edgeq.errors import EdgeqError  # noqa: E402
from edgeq.ir import LayerWidths, LowRank, ModelIR, PruneSpec, Role, linear_name  # noqa: E402
from edgeq.backends.gguf.lower import read_gguf, tensor_types, write_gguf  # noqa: E402
from edgeq.backends.gguf.rates import (  # noqa: E402
    RATE_KV,
    gguf_prune_spec,
    prunable_params_removed,
    rate_filename,
    reference_ir_for_gguf,
    reference_ir_for_gguf_rate,
    write_gguf_at_rate,
    write_gguf_rates,
)
from edgeq.passes.sort_qk import restore_rope_order  # noqa: E402

# --- tolerances -----------------------------------------------------------------------------
# F32 weights + F32 KV cache: llama.cpp and the numpy reference differ only by float rounding
# (measured ~2e-6 on these tiny models).
RATE_F32_MAX_ABS_DIFF = 1e-3
# Q8_0 weights vs the *float* reference on the same plan: llama.cpp also quantizes activations
# to Q8_0 in its dot products; measured rel 1.6-2.0 %, top-1 >= 0.958 on these chaotic random models.
RATE_Q8_MAX_REL_DIFF = 0.08  # max |llama.cpp - reference| / max |reference|
RATE_Q8_MIN_TOP1 = 0.8
# A sort by RoPE pairs is a row permutation: the reference runtime gives the same logits up to
# the order of float sums.
SORT_MAX_ABS_DIFF = 1e-4

IDS = [5, 100, 37, 200, 3, 77, 250, 12, 33, 1, 2, 300, 64, 65, 66, 101, 102, 7, 8, 9, 150, 151, 152, 299]
RATES = (0.0, 0.25, 0.5)
GRAN = 32  # tiny models: intermediate 128, head_dim 16, hidden 64, 4 heads / 2 KV heads


# --- helpers --------------------------------------------------------------------------------

def sort_rope_pairs(ir: ModelIR, seed: int) -> ModelIR:
    """Apply a random RoPE-pair permutation per layer and KV group to the Q/K rows (weights and
    biases) and record it in ``rope_index`` — what the UniQL sort does, written independently
    of edgeq.backends.gguf.rates."""
    rng = np.random.default_rng(seed)
    hp = ir.hparams
    D, half, group = hp.head_dim, hp.head_dim // 2, hp.num_heads // hp.num_kv_heads
    lins, index = dict(ir.linears), {}
    for layer in range(hp.num_layers):
        perm = np.stack([rng.permutation(half) for _ in range(hp.num_kv_heads)])  # slot -> original pair
        index[layer] = perm
        for role, n_head in ((Role.Q, hp.num_heads), (Role.K, hp.num_kv_heads)):
            rows = []
            for h in range(n_head):
                g = h // group if role == Role.Q else h
                rows += [h * D + perm[g, j] for j in range(half)] + [h * D + half + perm[g, j] for j in range(half)]
            lin = ir.linear(layer, role)
            lins[lin.name] = dataclasses.replace(
                lin, weight=np.ascontiguousarray(lin.weight[rows]),
                bias=None if lin.bias is None else np.ascontiguousarray(lin.bias[rows]))
    return ir.replace(linears=lins, rope_index=index)


def hand_spec(ir: ModelIR) -> PruneSpec:
    hp = ir.hparams
    full = LayerWidths(ffn=hp.intermediate_size, qk_pairs=hp.head_dim // 2, v_dims=hp.head_dim)
    return PruneSpec(rates=RATES, granularity=GRAN, widths={
        0.0: (full, full),
        0.25: (LayerWidths(96, 6, 12), LayerWidths(128, 8, 16)),
        0.5: (LayerWidths(64, 4, 8), LayerWidths(96, 6, 12)),
    })


def _reference_logits(ir: ModelIR, rate: float = 0.0) -> np.ndarray:
    from runtimes.reference import ReferenceSession

    s = ReferenceSession(ir, n_ctx=64)
    s.set_prune_rate(rate)
    return s.logits(IDS)


def _llamacpp(path):
    import llama_cpp  # noqa: F401
    from runtimes.llamacpp import LlamaCppSession

    with LlamaCppSession(path, n_ctx=64, kv_cache_type="f32") as s:
        return s.logits(IDS), s.metadata()


@pytest.fixture(scope="module")
def llama_ir(tiny_llama) -> ModelIR:
    from edgeq.frontend import load_model

    return load_model(tiny_llama)


@pytest.fixture(scope="module")
def sorted_llama(llama_ir) -> ModelIR:
    ir = sort_rope_pairs(llama_ir, seed=3)
    ir = ir.replace(prune=hand_spec(ir))
    ir.validate()
    return ir


@pytest.fixture(scope="module")
def f32_files(sorted_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("rates-f32")
    return out, write_gguf_rates(sorted_llama, out, 32)


# --- the plan GGUF can express --------------------------------------------------------------

def test_sorted_fixture_is_an_exact_reparametrisation(llama_ir, sorted_llama):
    assert not np.array_equal(sorted_llama.linear(0, Role.Q).weight, llama_ir.linear(0, Role.Q).weight)
    assert np.abs(_reference_logits(sorted_llama) - _reference_logits(llama_ir)).max() < SORT_MAX_ABS_DIFF
    restored = restore_rope_order(sorted_llama)
    assert restored.rope_index == {}
    for name, lin in llama_ir.linears.items():
        assert np.array_equal(restored.linears[name].weight, lin.weight), name


def test_gguf_spec_moves_the_attention_pruning_into_the_mlp(sorted_llama):
    ir = sorted_llama
    hp, full_spec = ir.hparams, ir.prune
    spec = gguf_prune_spec(ir)
    assert spec.rates == full_spec.rates and spec.granularity == GRAN
    prev = None
    for r in spec.rates:
        ws = spec.at(r)
        assert all(w.qk_pairs == hp.head_dim // 2 and w.v_dims == hp.head_dim for w in ws)
        assert all(w.ffn % GRAN == 0 and GRAN <= w.ffn <= hp.intermediate_size for w in ws)
        if prev is not None:
            assert all(a.ffn <= b.ffn for a, b in zip(ws, prev))
        prev = ws
        # the same number of prunable parameters, up to half a granularity step of MLP channels
        diff = prunable_params_removed(hp, ws) - prunable_params_removed(hp, full_spec.at(r))
        assert abs(diff) <= 3 * hp.hidden_size * GRAN // 2, (r, diff)
    assert [w.ffn for w in spec.at(0.0)] == [hp.intermediate_size] * hp.num_layers
    # layer 0 at 0.25 gives up 32 MLP channels + 2 pairs and 4 components (worth 16 channels):
    # 80 kept, a tie between 64 and 96 on the 32-grid, which keeps the extra step
    assert [w.ffn for w in spec.at(0.25)] == [96, 128]
    assert [w.ffn for w in spec.at(0.5)] == [32, 96]
    assert [w.ffn for w in gguf_prune_spec(ir, "drop-attention").at(0.5)] == [64, 96]
    # a plan that prunes only the MLP is already expressible: unchanged
    mlp_only = gguf_prune_spec(ir.replace(prune=spec))
    assert all(mlp_only.at(r) == spec.at(r) for r in spec.rates)
    assert gguf_prune_spec(ir.replace(prune=None)).rates == (0.0,)


def test_gguf_spec_overflow_goes_to_other_layers(sorted_llama):
    hp = sorted_llama.hparams
    full = LayerWidths(128, 8, 16)
    plan = PruneSpec(rates=(0.0, 0.6), granularity=GRAN, widths={
        0.0: (full, full), 0.6: (LayerWidths(32, 1, 1), full)})  # more than layer 0's MLP can give
    spec = gguf_prune_spec(sorted_llama.replace(prune=plan))
    ws = spec.at(0.6)
    assert ws[0].ffn == GRAN and ws[1].ffn < 128  # one step is the floor; layer 1 takes the rest
    diff = prunable_params_removed(hp, ws) - prunable_params_removed(hp, plan.at(0.6))
    assert abs(diff) <= 3 * hp.hidden_size * GRAN // 2


def test_reference_ir_for_a_rate(sorted_llama):
    one = reference_ir_for_gguf_rate(sorted_llama, 0.25)
    assert one.prune.rates == (0.0, 0.25) and one.rope_index == {}
    assert one.prune.at(0.25) == gguf_prune_spec(sorted_llama).at(0.25)
    assert reference_ir_for_gguf(sorted_llama).prune.rates == RATES
    with pytest.raises(EdgeqError, match="not carried"):
        reference_ir_for_gguf_rate(sorted_llama, 0.3)


# --- the files in llama.cpp -----------------------------------------------------------------

def test_f32_rate_files_match_the_reference(sorted_llama, f32_files):
    out, files = f32_files
    assert files == {r: rate_filename(r) for r in RATES}
    assert files[0.0] == "model-r0.gguf" and files[0.25] == "model-r0.25.gguf"
    for r, fname in files.items():
        got, md = _llamacpp(out / fname)
        ref = _reference_logits(reference_ir_for_gguf_rate(sorted_llama, r), r)
        assert np.abs(got - ref).max() < RATE_F32_MAX_ABS_DIFF, r
        # rate 0: one width everywhere -> plain llama; other rates: per-layer widths -> deci
        assert md["general.architecture"] == ("llama" if r == 0 else "deci")
        assert abs(float(md[RATE_KV]) - r) < 1e-6
        if r:
            reader = gguf.GGUFReader(str(out / fname))
            widths = [int(x) for x in reader.fields["deci.feed_forward_length"].contents()]
            assert widths == [w.ffn for w in gguf_prune_spec(sorted_llama).at(r)]


def test_rate_0_is_the_unpruned_original(llama_ir, f32_files):
    out, files = f32_files
    got, _ = _llamacpp(out / files[0.0])
    assert np.abs(got - _reference_logits(llama_ir)).max() < RATE_F32_MAX_ABS_DIFF
    back = read_gguf(out / files[0.0])  # exact: the pair sort undone, nothing cut
    for name, lin in llama_ir.linears.items():
        assert np.array_equal(back.linears[name].weight, lin.weight), name


def test_deci_forced_at_rate_0(sorted_llama, llama_ir, tmp_path):
    p = write_gguf_at_rate(sorted_llama, 0.0, tmp_path / "d.gguf", 32, arch="deci")
    got, md = _llamacpp(p)
    assert md["general.architecture"] == "deci"
    assert np.abs(got - _reference_logits(llama_ir)).max() < RATE_F32_MAX_ABS_DIFF


def test_q8_0_rate_files_close_and_sizes_shrink(sorted_llama, tmp_path):
    files = write_gguf_rates(sorted_llama, tmp_path, lambda r: tensor_types(sorted_llama, "Q8_0"))
    sizes = [(tmp_path / files[r]).stat().st_size for r in RATES]
    assert sizes[0] > sizes[1] > sizes[2], sizes
    for r in RATES:
        got, md = _llamacpp(tmp_path / files[r])
        ref = _reference_logits(reference_ir_for_gguf_rate(sorted_llama, r), r)
        rel = np.abs(got - ref).max() / np.abs(ref).max()
        top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
        assert rel < RATE_Q8_MAX_REL_DIFF and top1 >= RATE_Q8_MIN_TOP1, (r, rel, top1)
        assert int(md["general.file_type"]) == 7  # MOSTLY_Q8_0


def test_rate_0_file_equals_write_gguf_of_the_original(llama_ir, tmp_path):
    """Without a pair sort, rate 0 is exactly write_gguf's file plus the rate key."""
    ir = llama_ir.replace(prune=hand_spec(llama_ir))
    a = write_gguf_at_rate(ir, 0.0, tmp_path / "a.gguf", 8)
    b = write_gguf(llama_ir, tmp_path / "b.gguf", tensor_types(llama_ir, 8), extra_kv={RATE_KV: 0.0})
    assert a.read_bytes() == b.read_bytes()


def test_writes_are_deterministic(sorted_llama, tmp_path):
    a = write_gguf_rates(sorted_llama, tmp_path / "a", 8)
    b = write_gguf_rates(sorted_llama, tmp_path / "b", 8)
    for r in RATES:
        assert (tmp_path / "a" / a[r]).read_bytes() == (tmp_path / "b" / b[r]).read_bytes()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_qwen2_at_a_rate_through_deci(tiny_qwen2, tmp_path):
    """deci takes q/k/v biases and the NORM RoPE permutation makes a Qwen2 (NEOX) model exact."""
    from edgeq.frontend import load_model

    ir = sort_rope_pairs(load_model(tiny_qwen2), seed=5)
    assert ir.linear(0, Role.Q).bias is not None
    ir = ir.replace(prune=hand_spec(ir))
    files = write_gguf_rates(ir, tmp_path, 32)
    for r in (0.0, 0.5):
        got, md = _llamacpp(tmp_path / files[r])
        assert md["general.architecture"] == ("qwen2" if r == 0 else "deci")
        ref = _reference_logits(reference_ir_for_gguf_rate(ir, r), r)
        assert np.abs(got - ref).max() < RATE_F32_MAX_ABS_DIFF, r


def test_unsupported_cases_are_clear_errors(sorted_llama, tmp_path):
    with pytest.raises(EdgeqError, match="rate 0.3 is not carried"):
        write_gguf_at_rate(sorted_llama, 0.3, tmp_path / "x.gguf", 32)
    # a width off the quant block grid
    full = LayerWidths(128, 8, 16)
    odd = sorted_llama.replace(prune=PruneSpec(rates=(0.0, 0.2), granularity=16, widths={
        0.0: (full, full), 0.2: (LayerWidths(112, 8, 16), LayerWidths(80, 8, 16))}))
    msg = r"blk\.0\.ffn_down: Q8_0 needs a row length that is a multiple of 32, got 112"
    with pytest.raises(EdgeqError, match=msg):
        write_gguf_at_rate(odd, 0.2, tmp_path / "x.gguf", "Q8_0")
    write_gguf_at_rate(odd, 0.2, tmp_path / "ok.gguf", 16)  # F16 has no block constraint
    # low-rank branches have no place in a model GGUF
    q = sorted_llama.linear(0, Role.UP)
    lr = LowRank(a=np.zeros((2, q.in_features), np.float32), b=np.zeros((q.out_features, 2), np.float32),
                 scale=1.0, source="lora:x")
    with_lr = sorted_llama.replace(linears={**sorted_llama.linears,
                                            linear_name(0, Role.UP): dataclasses.replace(q, low_rank=(lr,))})
    with pytest.raises(EdgeqError, match="low-rank"):
        write_gguf_at_rate(with_lr, 0.25, tmp_path / "x.gguf", 32)
    with pytest.raises(EdgeqError, match="may not override"):
        write_gguf_at_rate(sorted_llama, 0.25, tmp_path / "x.gguf", 32, extra_kv={RATE_KV: 0.5})
    with pytest.raises(EdgeqError, match="expected arch"):
        write_gguf_at_rate(sorted_llama, 0.25, tmp_path / "x.gguf", 32, arch="llama")
    with pytest.raises(EdgeqError, match="expected mode"):
        gguf_prune_spec(sorted_llama, "whatever")
    assert not list(tmp_path.glob("x.gguf*")) and not list(tmp_path.glob(".x.gguf*"))
