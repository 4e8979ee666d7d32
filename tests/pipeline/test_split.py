"""A layer's linears quantized as one executor task each (edgeq.pipeline.split): the same bytes
as the sequential in-process quantization (edgeq.quant.apply.quantize_ir without a runner), each
task fed only its linear's weight and input covariance."""
from __future__ import annotations

import numpy as np
import pytest
from release_trees import leftovers, run_cli, same_tree

from edgeq.calibrate import alpaca_token_sequences, calibrate
from edgeq.frontend import load_model
from edgeq.pipeline.split import ProcessSplit, _arrays
from edgeq.plan import Choice, Plan, plan_tensor_shapes
from edgeq.quant.apply import COMP_SOURCE, quantize_ir

# a plan touching every path: several legacy types (the tiny model is too narrow for K-quants), F16 (no task),
# compensation ranks (QERA) on some linears of both layers
TYPES = {"attn_q": Choice("Q4_0", 16), "attn_k": Choice("Q4_1"), "attn_v": Choice("Q8_0"),
         "attn_output": Choice("Q5_1", 32), "ffn_gate": Choice("Q5_0"), "ffn_up": Choice("Q4_0", 16),
         "ffn_down": Choice("Q5_0", 32)}


@pytest.fixture(scope="module")
def calibrated(tiny_llama):
    ir = load_model(tiny_llama)
    return ir, calibrate(ir, alpaca_token_sequences(ir.tokenizer, n_samples=4, seq_len=32), progress=False)


def tiny_plan(ir) -> Plan:
    tensors = {}
    for name in plan_tensor_shapes(ir):
        role = name.split(".")[-1]
        tensors[name] = TYPES.get(role, Choice("Q8_0"))
    tensors["blk.1.attn_v"] = Choice("F16")  # (stays a float tensor: never a task)
    return Plan(target="cpu-avx2", tensors=tensors)


def linear_bytes(ir) -> dict[str, tuple]:
    out = {}
    for name, lin in ir.linears.items():
        packed = None if lin.packed is None else (lin.packed.qtype, np.asarray(lin.packed.data).tobytes())
        lrs = tuple((np.asarray(lr.a).tobytes(), np.asarray(lr.b).tobytes(), lr.source) for lr in lin.low_rank)
        out[name] = (np.asarray(lin.weight, np.float32).tobytes(), packed, lrs)
    return out


def test_process_tasks_per_linear_give_the_sequential_bytes(calibrated, tmp_path):
    ir, stats = calibrated
    plan = tiny_plan(ir)
    seq = quantize_ir(ir, plan, stats, progress=False)
    calls = []
    with ProcessSplit(str(tmp_path), 2).open() as run:
        def runner(tasks):
            calls.append(([job.name for job, _, _ in tasks], len(_arrays(tasks))))
            return run(tasks)

        split = quantize_ir(ir, plan, stats, progress=False, runner=runner)
    # one call per layer, one task per block-quantized linear (blk.1.attn_v is F16), and each
    # input shipped once: 7 (6) weights + 4 covariances (q/k/v share one, gate/up one)
    assert [len(names) for names, _ in calls] == [7, 6]
    assert all(n.startswith("blk.0.") for n in calls[0][0]) and all(n.startswith("blk.1.") for n in calls[1][0])
    assert [n for _, n in calls] == [7 + 4, 6 + 4]
    a, b = linear_bytes(seq), linear_bytes(split)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    comp = [n for n, lin in split.linears.items() if any(lr.source == COMP_SOURCE for lr in lin.low_rank)]
    assert len(comp) == 8  # (the ranked roles of both layers: the compensation ran in the tasks too)
    assert split.linears["blk.1.attn_v"].packed is None
    assert list(tmp_path.iterdir()) == []  # the split's files: removed


def test_a_runner_that_loses_results_is_an_error(calibrated):
    from edgeq.errors import EdgeqError

    ir, stats = calibrated
    with pytest.raises(EdgeqError, match="layer 0: 6 results for 7 linears"):
        quantize_ir(ir, tiny_plan(ir), stats, progress=False, runner=lambda tasks: [None] * (len(tasks) - 1))


def test_processes_release_splits_quantize_and_gives_the_inprocess_bytes(tiny_llama, tmp_path, capfd):
    """A planned matrix (planner + quantize per target): --executor processes runs each quantize
    step (in a matrix worker) with the linears as tasks of worker processes of its own; the
    release is byte-identical to the in-process one."""
    args = ["--target", "cpu-avx2,mobile-arm64", "--calib-samples", "4", "--calib-len", "32"]
    code, text = run_cli("build", tiny_llama, *args, "-o", tmp_path / "in")
    assert code == 0, text
    assert "as one task each" not in text
    code, text = run_cli("build", tiny_llama, *args, "--executor", "processes", "--jobs", "2", "-o", tmp_path / "pr")
    assert code == 0, text
    err = capfd.readouterr().err  # (the workers' log lines: their own stderr)
    assert err.count("quantizing a layer's linears as one task each (2 worker processes)") == 2, err
    same_tree(tmp_path / "in", tmp_path / "pr")
    assert leftovers(tmp_path) == []
