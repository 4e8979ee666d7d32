"""Roofline predictions: bytes / FLOPs per token, the binding bound, every hardware profile."""
import dataclasses

import pytest

from edgeq.ir import Arch, HParams
from edgeq.roofline import compute_peak, for_profiles, matmul_params, measure_host, predict, token_cost
from edgeq.targets import list_targets, load_target

SMOLLM2 = HParams(arch=Arch.LLAMA, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                  num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                  max_position_embeddings=8192, tie_word_embeddings=True, attention_bias=False)


def test_smollm2_counts():
    # 30 x (Q|K|V 576x960 + O 576x576 + 3 x 576x1536) + the tied head 49152x576
    assert matmul_params(SMOLLM2) == 30 * (576 * 960 + 576 * 576 + 3 * 576 * 1536) + 49152 * 576
    c = token_cost(SMOLLM2, weight_bytes=92_000_000)
    assert c.kv_bytes_per_position == 2 * 30 * 3 * 64 * 4
    assert c.flops == pytest.approx(2 * 134_479_872)
    b, f = c.decode(100)
    assert b == 92_000_000 + 100 * c.kv_bytes_per_position and f > c.flops


def test_the_smaller_bound_binds():
    c = token_cost(SMOLLM2, weight_bytes=100_000_000)
    mem = predict(c, bandwidth_gb_s=50, peak_tflops=1000, context=0)
    assert mem["decode_bound"] == "memory" and mem["decode_tok_s"] == pytest.approx(500)
    comp = predict(c, bandwidth_gb_s=1e6, peak_tflops=0.001, context=0)
    assert comp["decode_bound"] == "compute" and comp["decode_tok_s"] == pytest.approx(1e9 / c.flops)
    # a long prompt amortises the weight reads: prefill is compute-bound on a real device
    assert predict(c, 50, 1.0, prompt=512)["prefill_bound"] == "compute"
    # fewer weight bytes (a pruning rate) -> faster memory-bound decode
    half = dataclasses.replace(c, weight_bytes=50_000_000)
    assert predict(half, 50, 1000, context=0)["decode_tok_s"] == pytest.approx(2 * mem["decode_tok_s"])


def test_every_profile_gets_a_prediction_with_its_peak():
    c = token_cost(SMOLLM2, weight_bytes=92_000_000)
    rows = for_profiles(c, "llamacpp", "Q4_0")
    assert {r["profile"] for r in rows} == {t.name for t in list_targets()}
    by = {r["profile"]: r for r in rows}
    assert by["gpu-t4"]["peak_kind"] == "fp16" and by["cpu-avx2"]["peak_kind"] == "int8"
    assert by["gpu-rtx4090-laptop"]["decode_tok_s"] > by["cpu-avx2"]["decode_tok_s"]
    assert compute_peak(load_target("cpu-avx2"), "tvm", "INT4")[1] == "fp32"
    assert all(r["decode_bound"] == "memory" for r in rows)  # a 135M model decodes bandwidth-bound everywhere


def test_host_measurement_is_positive():
    h = measure_host(seconds=0.2, fresh=True)
    assert measure_host() == h  # cached: one roofline per process
    assert h["read_bandwidth_gb_s"] > 0.1 and h["fp32_matmul_tflops"] > 1e-4
