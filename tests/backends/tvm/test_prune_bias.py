"""TVM with bias compensation: per-rate vectors in the weights file, added by the runtime's numpy
decoder after the o / down kernels; equal to the reference runtime at every rate, switched in place."""
import platform

import numpy as np
import pytest

import tvm  # noqa: F401

from edgeq.artifact import write_manifest  # noqa: E402
from edgeq.backends.tvm import lower as lt  # noqa: E402
from edgeq.frontend.safetensors_io import read_safetensors  # noqa: E402
from runtimes.reference import ReferenceSession  # noqa: E402
from runtimes.tvmrt import TvmSession  # noqa: E402
from edgeq_tests_prune_bias import RATES, biased_ir, ids_for  # noqa: E402

HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
REL = 1e-4  # float32 kernels + numpy vs the float64 reference on the same dequantized weights

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="artifacts built for an x86 profile")


@pytest.mark.parametrize("dims", ["all", "mlp"])
def test_biased_artifact_matches_reference_at_every_rate(tiny_model, tmp_path, dims):
    ir = biased_ir(tiny_model, dims=dims)
    out = tmp_path / "a"
    out.mkdir()
    opts = lt.TvmOptions(bits=4, group=32, target=HOST)
    info = lt.write_tvm(ir, out, opts)
    write_manifest(out, {"format": "tvm", "tvm": info, "hparams": ir.hparams.to_json(),
                         "prune": {"rates": list(ir.prune.rates), "widths": ir.prune.to_json()["widths"]}})
    stored = read_safetensors(out / lt.WEIGHTS)
    assert stored["blk.0.down.rate_bias"].shape == (len(RATES), ir.hparams.hidden_size)
    assert not stored["blk.0.down.rate_bias"][0].any()  # rate 0 prunes nothing
    assert ("blk.0.o.rate_bias" in stored) == (dims == "all")  # MLP-only plans keep every V/O component
    low = lt.lowered_ir(ir, opts)
    ref, plain = ReferenceSession(low, dtype=np.float64), ReferenceSession(low.replace(prune_means={}), dtype=np.float64)
    ids = ids_for(ir)
    with TvmSession(out) as s:
        for r in RATES:  # switched in place, one session
            for x in (s, ref, plain):
                x.set_prune_rate(r)
            got, want, without = s.logits(ids), ref.logits(ids), plain.logits(ids)
            assert np.abs(got - want).max() <= REL * np.abs(want).max(), r
            if r > 0:
                assert np.abs(got - without).max() > 100 * REL * np.abs(want).max(), r
