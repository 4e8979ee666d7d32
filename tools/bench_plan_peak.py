"""Issue 14, item 4: the planner measurement step's own peak memory on one layer of a checkpoint.

    .venv/bin/python tools/bench_plan_peak.py CKPT     # calibrates on 2 x 32 tokens, measures layer 0

VmHWM is reset (/proc/self/clear_refs) after calibration, so ``step`` is the measurement's own
peak above the resident set before it (``base``: interpreter, IR, the in-memory statistics);
compare with edgeq.memory.planner_measure_bytes. One JSON line.
"""
import ctypes, sys, json
from pathlib import Path
from edgeq.calibrate import calibrate
from edgeq.frontend import load_model
from edgeq.plan import measure_options, plan_tensor_shapes
from edgeq.targets import load_target
ir = load_model(Path(sys.argv[1]))
stats = calibrate(ir, [list(range(1, 33))] * 2, progress=False)
t = load_target("cpu-avx2")
def field(k):
    return int([l for l in open("/proc/self/status") if l.startswith(k)][0].split()[1]) * 1024
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")
base, anon0, file0 = field("VmRSS"), field("RssAnon"), field("RssFile")
names = [n for n in plan_tensor_shapes(ir) if n.startswith("blk.0.")]
measure_options(ir, stats, t.plan_types("gguf"), t.plan_ranks, "rtn", probe=None, progress=False, linears=names, tables=False)
print(json.dumps({"base": base, "hwm": field("VmHWM"), "step": field("VmHWM") - base, "anon0": anon0, "file0": file0,
                  "anon_end": field("RssAnon"), "file_end": field("RssFile")}))
