"""The reference format's files: format 2 stores the linears in the runtime's layout, so a
session runs on views of the memory-mapped weights file (no float32 copy); format-1 artifacts
(natural order) still load and run identically."""
from __future__ import annotations

import json
import mmap

import numpy as np
import pytest

from edgeq.backends.reference.ir_files import FORMAT_VERSION, META, WEIGHTS, open_ir, read_ir, write_ir
from edgeq.frontend import load_adapter, load_model
from runtimes.reference import ReferenceSession


def _pruned_lora(tiny_llama, tiny_llama_lora):
    from edgeq.passes.naive_sort import naive_sort
    from edgeq.passes.rate_plan import apply_prune_spec, plan_rates

    ir = naive_sort(load_adapter(load_model(tiny_llama), tiny_llama_lora))
    return apply_prune_spec(ir, plan_rates(ir, (0.0, 0.25, 0.5), granularity=32, importance=np.array([0.1, 0.3])))


def _file_backed(a: np.ndarray) -> bool:
    """Whether ``a``'s memory is a file mapping (its base chain ends in an mmap)."""
    x = a
    while x is not None:
        if isinstance(x, mmap.mmap):
            return True
        x = getattr(x, "base", None) if isinstance(x, np.ndarray) else getattr(x, "_mmap", None)
    return False


def _write_v1(ir, d):
    """A format-1 artifact as edgeq wrote it before format 2: every array in natural order."""
    from safetensors.numpy import save_file

    d.mkdir()
    arrays = {}
    for n, lin in ir.linears.items():
        arrays[f"{n}.weight"] = np.asarray(lin.weight)
        if lin.bias is not None:
            arrays[f"{n}.bias"] = lin.bias
        for k, lr in enumerate(lin.low_rank):
            arrays[f"{n}.lr{k}.a"], arrays[f"{n}.lr{k}.b"] = lr.a, lr.b
    arrays.update({f"tensor.{n}": np.asarray(t) for n, t in ir.tensors.items()})
    arrays.update({f"rope_index.{i}": np.asarray(v, np.int64) for i, v in ir.rope_index.items()})
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(d / WEIGHTS))
    (d.parent / "meta").mkdir()
    write_ir(ir, d.parent / "meta")  # the same metadata, then marked as format 1
    meta = json.loads((d.parent / "meta" / META).read_text())
    meta["format_version"] = 1
    meta.pop("layout")
    (d / META).write_text(json.dumps(meta))


@pytest.fixture(params=["plain", "pruned+lora"])
def model(request, tiny_llama, tiny_llama_lora):
    return load_model(tiny_llama) if request.param == "plain" else _pruned_lora(tiny_llama, tiny_llama_lora)


def _outputs(s, ids):
    out = []
    for rate in s.prune_rates:
        s.set_prune_rate(rate)
        out.append(s.logits(ids))
        first = s._start(ids[:10])
        out.append(np.stack([first] + [s._step(t) for t in ids[10:]]))
    return out


def test_mapped_session_uses_the_file_in_place_and_equals_the_in_memory_model(model, tmp_path):
    write_ir(model, tmp_path)
    assert json.loads((tmp_path / META).read_text())["format_version"] == FORMAT_VERSION == 2
    ir, laid_out = open_ir(tmp_path)
    assert laid_out
    s = ReferenceSession(ir, n_ctx=64, laid_out=True)
    bufs = s.weight_buffers() + [s.embd, s.out_t] + [a for L in s.layers for br in L.lr.values()
                                                     for it in br.items for a in it[:2]]
    assert all(_file_backed(b) for b in bufs)  # no private copy of any weight
    ids = np.random.RandomState(0).randint(0, model.hparams.vocab_size, 24).tolist()
    want = _outputs(ReferenceSession(model, n_ctx=64), ids)
    for a, b in zip(_outputs(s, ids), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # only the head's matmul order differs


def test_read_ir_gives_the_natural_model_back(model, tmp_path):
    write_ir(model, tmp_path)
    back = read_ir(tmp_path)
    for n, lin in model.linears.items():
        got = back.linears[n]
        np.testing.assert_array_equal(got.weight, np.asarray(lin.weight))
        assert got.weight.flags.c_contiguous
        for lr, lr2 in zip(lin.low_rank, got.low_rank, strict=True):
            np.testing.assert_array_equal(lr2.a, lr.a)
            np.testing.assert_array_equal(lr2.b, lr.b)


def test_bias_compensation_means_round_trip_and_run_identically(tiny_llama, tiny_llama_lora, tmp_path):
    """A pruned model with LoRA branches and bias compensation means: the memory-mapped session
    (runtime layout, its own bias computation through O's permuted columns and the branches) equals
    the in-memory one at every rate, and read_ir gives the means back exactly."""
    from edgeq.ir import LayerMeans
    from edgeq.passes.prune_bias import with_prune_means

    ir = _pruned_lora(tiny_llama, tiny_llama_lora)
    hp = ir.hparams
    rng = np.random.default_rng(0)
    ir = with_prune_means(ir, [LayerMeans(down=rng.normal(size=hp.intermediate_size),
                                          o=rng.normal(size=hp.num_heads * hp.head_dim)) for _ in range(hp.num_layers)])
    write_ir(ir, tmp_path)
    back = read_ir(tmp_path)
    for li, m in ir.prune_means.items():
        np.testing.assert_array_equal(back.prune_means[li].down, m.down)
        np.testing.assert_array_equal(back.prune_means[li].o, m.o)
    mapped, laid_out = open_ir(tmp_path)
    ids = np.random.RandomState(0).randint(0, hp.vocab_size, 24).tolist()
    got = _outputs(ReferenceSession(mapped, n_ctx=64, laid_out=True), ids)
    want = _outputs(ReferenceSession(ir, n_ctx=64), ids)
    plain = _outputs(ReferenceSession(ir.replace(prune_means={}), n_ctx=64), ids)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert np.abs(got[-1] - plain[-1]).max() > 1e-3  # the largest rate really adds its bias


def test_format_1_artifacts_still_load_and_run_identically(model, tmp_path):
    _write_v1(model, tmp_path / "v1")
    ir, laid_out = open_ir(tmp_path / "v1")
    assert not laid_out
    ids = np.random.RandomState(1).randint(0, model.hparams.vocab_size, 20).tolist()
    want = _outputs(ReferenceSession(model, n_ctx=64), ids)
    for a, b in zip(_outputs(ReferenceSession(ir, n_ctx=64), ids), want, strict=True):
        np.testing.assert_array_equal(a, b)  # the same copies as before: bit for bit
    back = read_ir(tmp_path / "v1")
    for n, lin in model.linears.items():
        np.testing.assert_array_equal(back.linears[n].weight, np.asarray(lin.weight))


def test_unknown_format_version_is_a_clean_error(tiny_llama, tmp_path):
    from edgeq.errors import EdgeqError

    write_ir(load_model(tiny_llama), tmp_path)
    meta = json.loads((tmp_path / META).read_text())
    meta["format_version"] = 3
    (tmp_path / META).write_text(json.dumps(meta))
    for fn in (read_ir, open_ir):
        with pytest.raises(EdgeqError, match="unsupported format version 3"):
            fn(tmp_path)
