"""Gemma 3 through the TVM lowering and runtime (GeGLU, QK-norm, sandwich norms, scaled embedding,
query scaling, sliding-window and global layers with their RoPE bases) on the tiny random
checkpoints, whose prompts cross the sliding window: logits against the reference runtime (itself
checked against transformers, tests/runtimes/test_reference_gemma3.py) on the artifact's own
weights, prefill and decode with the KV cache; an MLP-pruned Gemma 3 switched between its rates in
one session, against the reference runtime at every rate."""
import platform

import numpy as np
import pytest

import tvm  # noqa: F401

from edgeq.artifact import write_manifest
from edgeq.backends.tvm import lower as lt
from edgeq.frontend import load_model
from runtimes.reference import ReferenceSession
from runtimes.tvmrt import TvmSession

HOST = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
REL = 1e-4  # as tests/backends/tvm/test_lower.py: float32 kernels + numpy vs the float64 reference
N_TOKENS = 24  # > 2 x the tiny model's sliding window (8)

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="artifacts built for an x86 profile")


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("query_block", [None, 5], ids=["one-block", "query-blocks-5"])
@pytest.mark.parametrize("which", ["tiny_gemma3", "tiny_gemma3_scaled"])
def test_logits_match_reference_runtime_prefill_and_decode(which, query_block, tmp_path, request, monkeypatch):
    """``query_block``: the prefill attention in blocks of 5 queries (runtimes.tvmrt.QUERY_BLOCK, 64
    by default), smaller than the window of 8: each block's keys start at its first query's window."""
    if query_block is not None:
        monkeypatch.setattr("runtimes.tvmrt.QUERY_BLOCK", query_block)
    ir = load_model(request.getfixturevalue(which))
    hp = ir.hparams
    assert hp.sliding_window < N_TOKENS // 2 and hp.qk_norm and hp.sandwich_norm
    out = tmp_path / "a"
    out.mkdir()
    opts = lt.TvmOptions(bits=4, group=32, target=HOST)
    write_manifest(out, {"format": "tvm", "tvm": lt.write_tvm(ir, out, opts), "hparams": hp.to_json()})
    ids = [int(t) for t in np.random.default_rng(0).integers(0, hp.vocab_size, N_TOKENS)]
    want = ReferenceSession(lt.lowered_ir(ir, opts), n_ctx=64, dtype=np.float64).logits(ids)
    s = TvmSession(out, n_ctx=64)
    assert _rel(s.logits(ids), want) <= REL
    # decode with the cache: a prompt, a chunk that starts inside the window, then single tokens
    s.reset()
    parts = [s._head(s._forward(ids[:5])), s._head(s._forward(ids[5:11]))]
    parts += [s._step(t)[None] for t in ids[11:]]
    assert _rel(np.concatenate(parts), want) <= REL
    # without the window (every layer global) the same weights are far from it: the window counts
    import dataclasses

    glob = ir.replace(hparams=dataclasses.replace(hp, layer_types=None))
    far = ReferenceSession(lt.lowered_ir(glob, opts), n_ctx=64, dtype=np.float64).logits(ids)
    assert _rel(far, want) > 100 * REL


def test_pruned_artifact_matches_reference_at_every_rate(pruned_gemma3_ir, tmp_path):
    """MLP-pruned Gemma 3 (UniQL sort, --prune-dims mlp, --prune-bias): the kernels at the rate's
    active GeGLU width plus the rate's bias rows, prefill and decode across the window, equal to the
    reference runtime on the artifact's own weights at rates 0 and 0.25."""
    ir = pruned_gemma3_ir
    out = tmp_path / "a"
    out.mkdir()
    opts = lt.TvmOptions(bits=4, group=32, target=HOST)
    write_manifest(out, {"format": "tvm", "tvm": lt.write_tvm(ir, out, opts), "hparams": ir.hparams.to_json(),
                         "prune": {"rates": list(ir.prune.rates), "widths": ir.prune.to_json()["widths"]}})
    low = lt.lowered_ir(ir, opts)
    ref = ReferenceSession(low, n_ctx=64, dtype=np.float64)
    plain = ReferenceSession(low.replace(prune_means={}), n_ctx=64, dtype=np.float64)
    ids = [int(t) for t in np.random.default_rng(3).integers(0, ir.hparams.vocab_size, N_TOKENS)]
    want = {}
    with TvmSession(out, n_ctx=64) as s:
        for r in ir.prune.rates:  # switched in place, one session
            for x in (s, ref, plain):
                x.set_prune_rate(r)
            want[r] = ref.logits(ids)
            assert _rel(s.logits(ids), want[r]) <= REL, r
            s.reset()
            parts = [s._head(s._forward(ids[:5])), s._head(s._forward(ids[5:11]))]
            parts += [s._step(t)[None] for t in ids[11:]]
            assert _rel(np.concatenate(parts), want[r]) <= REL, r
            if r:
                assert _rel(plain.logits(ids), want[r]) > 100 * REL
    assert _rel(want[0.25], want[0.0]) > 100 * REL
