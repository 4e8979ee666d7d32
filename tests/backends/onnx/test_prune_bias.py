"""ONNX with bias compensation: onnxruntime runs the multi-rate graph, whose per-rate bias rows
(Gather on rate_index) equal the reference runtime's at every rate."""
import numpy as np
import pytest

import onnxruntime  # noqa: F401

from edgeq.artifact import write_manifest  # noqa: E402
from edgeq.backends.onnx import lower as lo  # noqa: E402
from runtimes.onnxrt import OnnxSession  # noqa: E402
from runtimes.reference import ReferenceSession  # noqa: E402
from edgeq_tests_prune_bias import RATES, biased_ir, ids_for  # noqa: E402

INT4 = dict(linear="int4_g32_sym", head="int8_g32_sym")
REL = 1e-4  # fp32 activations (accuracy_level 1) vs the float64 reference on the same dequantized weights


@pytest.mark.parametrize("ffn_rates", lo.FFN_RATES)
@pytest.mark.parametrize("attention", ["gqa", "standard"])
def test_biased_graph_matches_reference_at_every_rate(tiny_model, tmp_path, attention, ffn_rates):
    ir = biased_ir(tiny_model)
    out = tmp_path / "a"
    out.mkdir()
    opts = lo.OnnxOptions(attention=attention, accuracy_level=1, ffn_rates=ffn_rates, **INT4)
    write_manifest(out, {"format": "onnx", "onnx": lo.write_onnx(ir, out, opts), "hparams": ir.hparams.to_json()})
    s = OnnxSession(out)
    low = lo.lowered_ir(ir, opts)
    ref, plain = ReferenceSession(low, dtype=np.float64), ReferenceSession(low.replace(prune_means={}), dtype=np.float64)
    ids = ids_for(ir)
    for r in RATES:
        for x in (s, ref, plain):
            x.set_prune_rate(r)
        got, want, without = s.logits(ids), ref.logits(ids), plain.logits(ids)
        assert np.abs(got - want).max() <= REL * np.abs(want).max(), r
        if r > 0:  # the graph really adds the rate's bias
            assert np.abs(got - without).max() > 100 * REL * np.abs(want).max(), r


def test_bias_tables_are_initializers_gathered_by_rate(tiny_llama, tmp_path):
    import onnx

    ir = biased_ir(tiny_llama)
    out = tmp_path / "a"
    out.mkdir()
    lo.write_onnx(ir, out, lo.OnnxOptions(**INT4))
    m = onnx.load(str(out / lo.MODEL_FILE), load_external_data=False)
    gathers = [n for n in m.graph.node if n.op_type == "Gather" and "bias_" in n.input[0]]
    adds = {n.name for n in m.graph.node if n.name.endswith("_rate_bias")}
    assert gathers and all(n.input[1] == lo.RATE_INPUT for n in gathers)
    assert {f"blk.{i}.down_rate_bias" for i in range(ir.hparams.num_layers)} <= adds
