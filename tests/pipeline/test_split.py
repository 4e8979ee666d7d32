"""A layer's linears quantized as one executor task each (edgeq.pipeline.split): the same bytes
as the sequential in-process quantization (edgeq.quant.apply.quantize_ir without a runner), each
task fed only its linear's weight and input covariance."""
from __future__ import annotations

import numpy as np
import pytest
from calib_bits import stats_bits
from release_trees import leftovers, run_cli, same_tree
from split_faults import DiesOnce, KindDiesOnce

from edgeq.calibrate import alpaca_token_sequences, calibrate, run_shard
from edgeq.frontend import load_model
from edgeq.pipeline.split import ProcessSplit, _arrays, heaviest_first
from edgeq.plan import Choice, Plan, plan_tensor_shapes
from edgeq.quant.apply import COMP_SOURCE, quantize_ir
from edgeq.quant.linear_task import LinearJob, run_linear
from runtimes.reference import LayerWeights

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


def test_a_process_task_whose_worker_died_is_run_again(calibrated, tmp_path):
    ir, stats = calibrated
    plan = tiny_plan(ir)
    tasks = []
    for name in ("blk.0.attn_q", "blk.0.attn_k", "blk.0.ffn_down"):
        lin, c = ir.linears[name], plan.tensors[name]
        job = LinearJob(name, c.type, "gptq", 0.01, False, c.rank)
        tasks.append((job, lin.weight, stats.layers[0].input_cov(lin.role)))
    marker = tmp_path / "marker"
    work = tmp_path / "work"
    work.mkdir()
    dies = [(DiesOnce.of(tasks[1][0], marker), *tasks[1][1:])]
    with ProcessSplit(str(work), 2).open() as run:
        got = run(tasks[:1] + dies + tasks[2:])
    assert marker.read_text() == "killed"  # a worker did die
    for (job, w, cov), r in zip(tasks, got):
        want = run_linear(job, w, cov)
        assert r.dequant.tobytes() == want.dequant.tobytes() and r.packed.tobytes() == want.packed.tobytes()
        assert (r.low_rank is None) == (want.low_rank is None) == (job.rank == 0)
        if want.low_rank:
            assert all(x.tobytes() == y.tobytes() for x, y in zip(r.low_rank, want.low_rank))
    assert list(work.iterdir()) == []


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


def test_a_single_target_build_splits_quantize_over_processes(tiny_llama, tmp_path):
    """`--executor processes` on one target: no matrix, the quantize step's linears as tasks."""
    args = ["--target", "cpu-avx2", "--calib-samples", "4", "--calib-len", "32"]
    code, text = run_cli("build", tiny_llama, *args, "-o", tmp_path / "in")
    assert code == 0, text
    code, text = run_cli("build", tiny_llama, *args, "--executor", "processes", "--jobs", "2", "-o", tmp_path / "pr")
    assert code == 0, text
    assert "quantizing a layer's linears as one task each (2 worker processes)" in text, text
    same_tree(tmp_path / "in", tmp_path / "pr")
    assert leftovers(tmp_path) == []


def test_the_heaviest_linear_is_submitted_first():
    """The 1B shape's layer: down_proj (2048 x 8192: its 8192^3 inverse Hessian) first, then the
    8192 x 2048 gate/up, the 2048^2 q/o, the 512 x 2048 k/v (ties in task order)."""
    shapes = {"q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048),
              "gate": (8192, 2048), "up": (8192, 2048), "down": (2048, 8192)}
    tasks = [(name, np.lib.stride_tricks.as_strided(np.zeros(1), shape, (0, 0)), None)  # (shapes, no memory)
             for name, shape in shapes.items()]
    assert [tasks[i][0] for i in heaviest_first(tasks)] == ["down", "gate", "up", "q", "o", "k", "v"]


@pytest.mark.parametrize("args,message", [
    (["--executor", "dask"], "unknown executor 'dask'"),
    (["--executor", "processes", "--ray-address", "127.0.0.1:1"], "--ray-address applies to --executor ray"),
])
def test_bad_executor_options_of_a_single_build_are_one_line_errors(args, message, tiny_llama, tmp_path):
    out = tmp_path / "one"
    code, text = run_cli("build", tiny_llama, "--target", "cpu-avx2", "--bits", "4", *args, "-o", out)
    assert code == 1 and text.startswith("error:") and message in text and len(text.strip().splitlines()) == 1, text
    assert list(tmp_path.iterdir()) == []


def test_calibration_shards_as_process_tasks_give_the_in_process_bits(tiny_llama, tmp_path):
    """Calibration's shards (10 samples, shards of 4) as tasks of 2 worker processes (the layer's
    weights and the shards' residual streams as files): the statistics of 1 thread, bit for bit."""
    ir = load_model(tiny_llama)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=10, seq_len=32)
    want = stats_bits(calibrate(ir, seqs, progress=False, workers=1, shard_samples=4))
    for window in (1, 2):
        with ProcessSplit(str(tmp_path), 2).open_shards(window) as runner:
            got = calibrate(ir, seqs, progress=False, runner=runner, shard_samples=4)
        assert stats_bits(got) == want, window
    assert list(tmp_path.iterdir()) == []  # the shards' files: removed


def test_a_calibration_shard_whose_worker_died_is_run_again(tiny_llama, tmp_path):
    ir = load_model(tiny_llama)
    hp, L = ir.hparams, LayerWeights(ir, 0, np.float32)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((16, hp.hidden_size)).astype(np.float32) for _ in range(5)]
    shards = [xs[0:2], xs[2:4], xs[4:5]]
    marker, work = tmp_path / "marker", tmp_path / "work"
    work.mkdir()
    with ProcessSplit(str(work), 2).open_shards(2) as runner:
        got = list(runner(hp, L, KindDiesOnce.of("stats", marker), len(shards), lambda k: shards[k]))
    assert marker.read_text() == "killed"  # a worker did die
    assert len(got) == 3
    for k, (parts, ys) in enumerate(got):
        want_parts, want_ys = run_shard(hp, L, "stats", shards[k])
        assert [y.tobytes() for y in ys] == [y.tobytes() for y in want_ys]
        assert parts.keys() == want_parts.keys()
        for name, v in want_parts.items():
            assert np.asarray(parts[name]).tobytes() == np.asarray(v).tobytes(), name
    assert list(work.iterdir()) == []


def test_a_pruned_build_over_processes_calibrates_in_shard_tasks(tiny_llama, tmp_path):
    """`--executor processes` on one target with 10 calibration samples (2 shards): the calibrate
    step runs its shards as tasks; the artifact is byte-identical to the in-process build's."""
    args = ["--target", "cpu-avx2", "--bits", "8", "--prune-rates", "0,0.25", "--calib-samples", "10",
            "--calib-len", "32"]
    code, text = run_cli("build", tiny_llama, *args, "-o", tmp_path / "in")
    assert code == 0, text
    assert "2 shards of up to 8, " in text and "(threads)" in text, text
    code, text = run_cli("build", tiny_llama, *args, "--executor", "processes", "--jobs", "2", "-o", tmp_path / "pr")
    assert code == 0, text
    assert "2 shards of up to 8, 2 at a time as tasks (2 worker processes)" in text, text
    same_tree(tmp_path / "in", tmp_path / "pr")
    assert leftovers(tmp_path) == []
