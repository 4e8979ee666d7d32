"""edgeq.memory: a build that would not fit is refused before it starts, with one error line;
and peak memory of a streamed build grows with the largest layer, not with the depth."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq import memory
from edgeq.cli import main
from edgeq.frontend.hf import hparams_from_config

REPO = Path(__file__).resolve().parents[1]


def test_parse_size():
    assert memory.parse_size("4G") == 4 << 30
    assert memory.parse_size("512M") == 512 << 20
    assert memory.parse_size("1.5GiB") == int(1.5 * (1 << 30))
    with pytest.raises(Exception, match="EDGEQ_MEMORY_LIMIT"):
        memory.parse_size("lots")


def test_estimates_follow_the_shapes():
    cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    hp = hparams_from_config(cfg, Path("x"))
    assert memory.model_params(hp) == pytest.approx(8.03e9, rel=0.01)  # Llama-3.1-8B
    kw = dict(fmt="gguf", prunes=False, planned=False, recover=False, goldens=True, calib_samples=64, calib_len=256)
    streamed = max(s.bytes for s in memory.build_steps(hp, **kw))
    assert streamed < 3e9  # layer-bounded: the --bits build of an 8B model
    deep = hparams_from_config({**cfg, "num_hidden_layers": 64}, Path("x"))
    assert max(s.bytes for s in memory.build_steps(deep, **kw)) == streamed  # depth does not count
    planned = max(s.bytes for s in memory.build_steps(hp, **{**kw, "planned": True}))
    assert planned < 8e9  # the probe is left out where it does not fit (build.plan_for) ...
    assert memory.probe_bytes(hp) > 4 * 8e9  # ... because it runs the whole model in float32


def test_refused_before_the_build_with_one_line(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_MEMORY_LIMIT", "300M")
    r = CliRunner().invoke(main, ["build", str(tiny_llama), "--bits", "4", "-o", str(tmp_path / "out")])
    assert r.exit_code == 1
    lines = [l for l in r.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "needs about" in lines[0] and "available" in lines[0], r.output
    assert not (tmp_path / "out").exists()


_PEAK = r'''
import sys
from pathlib import Path
from edgeq.build import BuildOptions, build
from edgeq.frontend import load_model
from runtimes.reference import streamed_logits
model, out, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if what == "build":  # load, plan types, stream the GGUF (goldens measured on their own below)
    build(BuildOptions(model=model, out=out, bits=4, force=True, record_goldens=False), log=lambda m: None)
else:  # the goldens' reference: float64 arithmetic, layer by layer
    streamed_logits(load_model(model), [list(range(1, 33))] * 3)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        print(int(line.split()[1]) * 1024)
'''


def _checkpoint(root: Path, tiny_llama: Path, layers: int, f: int = 2048) -> Path:
    """A random Llama with 512-wide layers (ffn ``f``) and ``layers`` layers, float32, the tiny
    model's tokenizer."""
    from safetensors.numpy import save_file

    out = root / f"wide-{layers}-{f}"
    if out.exists():
        return out
    out.mkdir()
    cfg = json.loads((tiny_llama / "config.json").read_text())
    h, H, KV, D = 512, 8, 4, 64
    cfg.update(hidden_size=h, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=H,
               num_key_value_heads=KV, head_dim=D, tie_word_embeddings=True)
    (out / "config.json").write_text(json.dumps(cfg))
    for p in tiny_llama.iterdir():
        if p.name.startswith("tokenizer") or p.name == "special_tokens_map.json":
            (out / p.name).write_bytes(p.read_bytes())
    rng = np.random.default_rng(0)
    V = cfg["vocab_size"]
    t = {"model.embed_tokens.weight": rng.standard_normal((V, h)).astype(np.float32) * 0.02,
         "model.norm.weight": np.ones(h, np.float32)}
    shapes = {"self_attn.q_proj": (H * D, h), "self_attn.k_proj": (KV * D, h), "self_attn.v_proj": (KV * D, h),
              "self_attn.o_proj": (h, H * D), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    for i in range(layers):
        for k, s in shapes.items():
            t[f"model.layers.{i}.{k}.weight"] = (rng.standard_normal(s) * 0.02).astype(np.float32)
        t[f"model.layers.{i}.input_layernorm.weight"] = np.ones(h, np.float32)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(h, np.float32)
    save_file(t, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("what", ["build", "goldens"])
def test_peak_memory_grows_with_the_layer_not_the_depth(tiny_llama, tmp_path, what):
    """A 12-layer model's peak is within two layers of a 2-layer one's (10 more layers = 157 MB of
    float32 weights, 315 MB as the float64 reference once held). Running the artifact itself in
    llama.cpp (the artifact half of the goldens) costs what llama.cpp costs: its mapped file plus
    its CPU repack of Q4_0 weights, about twice the file (docs/benchmarks.md)."""
    peaks = {}
    for layers in (2, 12):
        ckpt = _checkpoint(tmp_path, tiny_llama, layers)
        r = subprocess.run([sys.executable, "-c", _PEAK, str(ckpt), str(tmp_path / f"out-{layers}"), what],
                           capture_output=True, text=True, cwd=REPO, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks[layers] = int(r.stdout.split()[-1])
    layer_f32 = 4 * (512 * (2 * 512 + 2 * 256) + 3 * 512 * 2048)  # 15.7 MB
    assert peaks[12] - peaks[2] < 2 * layer_f32, peaks


def test_every_format_is_layer_bounded():
    cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    hp = hparams_from_config(cfg, Path("x"))
    deep = hparams_from_config({**cfg, "num_hidden_layers": 80}, Path("x"))
    kv_growth = 2 * (80 - 32) * 256 * 8 * 128 * 4  # the runtime's float32 KV cache of 256 positions (goldens)
    for fmt in ("gguf", "onnx", "tvm", "reference"):
        kw = dict(fmt=fmt, prunes=False, planned=False, recover=False, goldens=True, calib_samples=64, calib_len=256)
        assert max(s.bytes for s in memory.build_steps(hp, **kw)) < 3e9, fmt
        for a, b in zip(memory.build_steps(hp, **kw), memory.build_steps(deep, **kw)):
            assert 0 <= b.bytes - a.bytes <= (kv_growth if a.name == "recording goldens" else 0), (fmt, a, b)


def test_refused_when_the_spill_disk_is_too_small(tmp_path, monkeypatch):
    cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    hp = hparams_from_config(cfg, Path("x"))
    assert memory.spill_bytes(hp, prunes=True, planned=False) > 50e9  # 8B statistics in float64: said up front
    assert memory.spill_bytes(hp, prunes=False, planned=False) == 0
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 10**9))
    kw = dict(fmt="gguf", prunes=True, planned=False, recover=False, goldens=True, calib_samples=64, calib_len=256)
    monkeypatch.setenv("EDGEQ_MEMORY_LIMIT", "100G")
    with pytest.raises(Exception, match="on disk"):
        memory.check_build(hp, spill_dir=tmp_path, **kw)
    memory.check_build(hp, spill_dir=None, **kw)  # memory alone fits under the 100G cap


_PLAN_PEAK = r'''
import ctypes, sys
from pathlib import Path
from edgeq.calibrate import calibrate
from edgeq.frontend import load_model
from edgeq.plan import measure_options
from edgeq.targets import load_target
ir = load_model(Path(sys.argv[1]))
stats = calibrate(ir, [list(range(1, 33))] * 2, progress=False)
t = load_target("cpu-avx2")
def field(k):
    return int([l for l in open("/proc/self/status") if l.startswith(k)][0].split()[1]) * 1024
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what calibration freed goes back: the step's peak is its own
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
base = field("VmRSS")
measure_options(ir, stats, t.plan_types("gguf"), t.plan_ranks, "rtn", probe=None, progress=False,
                workers=int(sys.argv[2]))
print(field("VmHWM") - base)
'''


@pytest.mark.parametrize("workers", [1, 2])
def test_planner_measurement_peak_is_what_the_memory_check_predicts(tiny_llama, tmp_path, workers):
    """The memory check's model of the planner's measurement step (edgeq.memory.planner_measure_bytes)
    against the step's measured peak (VmHWM reset before it) on a random model whose step needs
    ~0.25 GB (ffn 4096: a 134 MB float64 covariance), with 1 and 2 linears measured at once: an
    upper-side estimate, within a factor 2."""
    ckpt = _checkpoint(tmp_path, tiny_llama, 2, f=4096)
    r = subprocess.run([sys.executable, "-c", _PLAN_PEAK, str(ckpt), str(workers)], capture_output=True, text=True,
                       cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    measured = int(r.stdout.split()[-1])
    hp = hparams_from_config(json.loads((ckpt / "config.json").read_text()), ckpt)
    predicted = memory.planner_measure_bytes(hp, workers)
    assert predicted / 2 <= measured <= predicted, (measured, predicted)
    step = next(s for s in memory.build_steps(hp, fmt="gguf", prunes=False, planned=True, recover=False,
                                              goldens=False, calib_samples=2, calib_len=32) if s.name.startswith("planning"))
    assert step.bytes == memory.BASE_BYTES + memory.planner_measure_bytes(hp, memory.planner_workers(hp))


_MEASURED_PEAK = r'''
import ctypes, sys
from pathlib import Path
from edgeq.frontend import load_model
from edgeq.passes.prune_sensitivity import mlp_loss_curves
ir = load_model(Path(sys.argv[1]))
def field(k):
    return int([l for l in open("/proc/self/status") if l.startswith(k)][0].split()[1]) * 1024
mlp_loss_curves(ir, [list(range(1, 17))], 32)  # warm-up: torch's code pages and thread pools are not the step's
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
base = field("VmRSS")
mlp_loss_curves(ir, [list(range(1, 257))] * 4, 32)
print(field("VmHWM") - base)
'''


def test_measured_allocation_peak_is_what_the_memory_check_predicts(tiny_llama, tmp_path):
    """The memory check's estimate of the measured pruning allocation (--importance measured: a
    torch forward of the whole model, every layer's input cached, a tail re-run per layer and
    probe width) against the step's measured peak (VmHWM reset before it) on a random 4-layer
    model, 4 x 256 probe tokens: an upper-side estimate, within a factor 2 of the step's own peak."""
    ckpt = _checkpoint(tmp_path, tiny_llama, 4, f=2048)
    r = subprocess.run([sys.executable, "-c", _MEASURED_PEAK, str(ckpt)], capture_output=True, text=True, cwd=REPO,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    measured = int(r.stdout.split()[-1])
    hp = hparams_from_config(json.loads((ckpt / "config.json").read_text()), ckpt)
    kw = dict(fmt="gguf", prunes=True, planned=False, recover=False, goldens=False, calib_samples=4, calib_len=256)
    assert not any(s.name.startswith("measured") for s in memory.build_steps(hp, **kw))
    step = next(s for s in memory.build_steps(hp, **kw, measured=True) if s.name.startswith("measured"))
    predicted = step.bytes - memory.BASE_BYTES
    assert predicted / 2 <= measured <= predicted, (measured, predicted)


def test_sort_layers_at_once_follow_the_memory_there_is(monkeypatch):
    cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    hp = hparams_from_config(cfg, Path("x"))
    one = memory.sort_layer_bytes(hp)
    assert one == 3 * 8 * 14336 ** 2  # the 8B MLP sort: three ffn x ffn float64 buffers
    assert memory.sort_workers(hp, threads=2, avail=100 << 30) == 2
    assert memory.sort_workers(hp, threads=16, avail=100 << 30) == 4  # at most 4
    assert memory.sort_workers(hp, threads=2, avail=2 * (memory.BASE_BYTES + one) - 2) == 1  # two would pass half
    assert memory.sort_workers(hp, threads=1, avail=100 << 30) == 1
    kw = dict(fmt="gguf", prunes=True, planned=False, recover=False, goldens=False, calib_samples=8, calib_len=64)
    monkeypatch.setenv("EDGEQ_THREADS", "2")
    for avail, workers in ((100 << 30, 2), (6 << 30, 1)):
        monkeypatch.setattr(memory, "available_bytes", lambda avail=avail: avail)
        sort = next(s for s in memory.build_steps(hp, **kw) if s.name == "UniQL sorting")
        assert sort.bytes == memory.BASE_BYTES + workers * one + 3 * 2 * 4 * 14336 * 4096


def test_calibration_estimate_counts_the_shard_sums_in_flight():
    """Calibration holds a layer's running sum plus a set of float64 sums per shard in flight
    (edgeq.calibrate: Shards): each worker adds one set (8B shape: the 14336^2 MLP Gram matrix,
    1.6 GB) until there are no more shards than that; fewer workers where memory is short."""
    from edgeq.calibrate import SHARD_SAMPLES

    cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    hp = hparams_from_config(cfg, Path("x"))
    acc = 8 * (14336 ** 2 + 3 * 4096 ** 2)
    n, T = 8 * SHARD_SAMPLES, 256
    b = {w: memory.calibration_bytes(hp, n, T, w) for w in (1, 2, 3, 8, 9)}
    # (each: a set of sums and a worker's forward temporaries, +10 % for the allocator)
    assert 1.1 * acc <= b[2] - b[1] <= 1.2 * acc and 1.1 * acc <= b[3] - b[2] <= 1.2 * acc
    assert b[9] == b[8]  # (8 shards: at most 8 in flight)
    # one shard (the whole of a small calibration): no partial sums beside it, whatever the workers
    assert memory.calibration_bytes(hp, SHARD_SAMPLES, T, 4) == memory.calibration_bytes(hp, SHARD_SAMPLES, T, 1)
    kw = dict(fmt="gguf", prunes=True, planned=False, recover=False, goldens=True, calib_samples=n, calib_len=T)
    step = next(s for s in memory.build_steps(hp, **kw, calib_workers=3) if s.name == "calibration")
    assert step.bytes == memory.BASE_BYTES + b[3]
    assert memory.calib_workers(hp, n, T, 4, avail=memory.BASE_BYTES + b[2]) == 2
    assert memory.calib_workers(hp, n, T, 4, avail=0) == 1  # (then the memory check refuses, if even 1 does not fit)
    assert memory.calib_workers(hp, n, T, 16, avail=10 ** 15) == 8
    assert memory.calib_workers(hp, 3, T, 4, avail=10 ** 15) == 1


_CALIB_PEAK = r'''
import ctypes, sys
from pathlib import Path
from edgeq.blas import one_blas_thread
from edgeq.calibrate import calibrate
from edgeq.frontend import load_model
from edgeq.spill import spilling
ir = load_model(Path(sys.argv[1]))
workers = int(sys.argv[2])
seqs = [list(range(1 + i, 33 + i)) for i in range(24)]  # 3 shards of 8
def field(k):
    return int([l for l in open("/proc/self/status") if l.startswith(k)][0].split()[1]) * 1024
with one_blas_thread(), spilling(sys.argv[3]):  # (as a build: each layer's statistics spilled)
    calibrate(ir, seqs[:9], progress=False, workers=workers)  # warm-up: threads, their BLAS buffers
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    base = field("VmRSS")
    calibrate(ir, seqs, progress=False, workers=workers)
    print(field("VmHWM") - base)
'''


def test_calibration_peak_is_what_the_memory_check_predicts(tiny_llama, tmp_path):
    """The memory check's model of sharded calibration (edgeq.memory.calibration_bytes) against the
    step's measured peak (VmHWM reset before it) on a random 2-layer model with a 4096-wide MLP
    (a set of sums: 140 MB), 24 samples (3 shards), 1 and 2 worker threads: upper-side, within a
    factor 2. (Whether the third set is resident at the peak depends on the threads' timing: a
    fresh set's pages are touched by its first Gram update, so no lower bound on the difference.)"""
    ckpt = _checkpoint(tmp_path, tiny_llama, 2, f=4096)
    hp = hparams_from_config(json.loads((ckpt / "config.json").read_text()), ckpt)
    measured = {}
    for workers in (1, 2):
        r = subprocess.run([sys.executable, "-c", _CALIB_PEAK, str(ckpt), str(workers), str(tmp_path)],
                           capture_output=True, text=True, cwd=REPO, timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        measured[workers] = int(r.stdout.split()[-1])
        predicted = memory.calibration_bytes(hp, 24, 32, workers)
        assert predicted / 2 <= measured[workers] <= predicted, (workers, measured[workers], predicted)
