"""A device process never loads torch (issue 16, item 3).

``edgeq run``, ``verify`` and ``profile`` of a GGUF, ONNX and TVM artifact, one after the other in
one fresh process (nothing blocked by the test: torch and transformers are installed and
importable), must end with neither in ``sys.modules``. TVM's ``tvm_ffi`` imports torch whenever it
is installed (~210 MB of RSS); runtimes/tvmrt.py loads TVM with that import answered "not found".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main

REPO = Path(__file__).resolve().parents[2]

# runs the three commands through the CLI's entry point, then reports what got imported
PROBE = r"""
import json, sys
from edgeq.cli import main
art = sys.argv[1]
codes = []
for args in (["run", art, "--prompt", "hello", "--max-tokens", "4"],
             ["verify", art],
             ["profile", art, "--runs", "1", "--max-tokens", "4"]):
    try:
        main(args, prog_name="edgeq")
    except SystemExit as e:
        codes.append(e.code)
maps = open("/proc/self/maps").read()
print("PROBE " + json.dumps({"codes": codes, "modules": sorted(m for m in ("torch", "transformers", "tvm", "tvm_ffi",
                                                                           "onnxruntime", "llama_cpp")
                                                              if sys.modules.get(m) is not None),
                             "tvm_compiler": "libtvm_compiler" in maps}))
"""


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def artifacts(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("no-torch")
    out = {}
    for fmt in ("gguf", "onnx", "tvm"):
        _cli("build", tiny_llama, "--format", fmt, "--bits", "4", "-o", d / fmt)
        out[fmt] = d / fmt
    return out


@pytest.mark.parametrize("fmt,runtime_module", [("gguf", "llama_cpp"), ("onnx", "onnxruntime"), ("tvm", "tvm_ffi")])
def test_run_verify_profile_never_import_torch(artifacts, fmt, runtime_module):
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEQ_TVM_COMPILER", "TVM_USE_RUNTIME_LIB")}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", PROBE, str(artifacts[fmt])], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")][-1]
    got = json.loads(line[len("PROBE "):])
    assert got["codes"] == [0, 0, 0], r.stdout[-2000:] + r.stderr[-2000:]
    assert runtime_module in got["modules"], got  # the artifact really ran on its runtime
    assert "torch" not in got["modules"] and "transformers" not in got["modules"], got
    assert not got["tvm_compiler"], got


def test_torch_still_importable_after_the_tvm_runtime(artifacts):
    """The block lasts only while TVM loads: a later ``import torch`` in the process works, and the
    weights still reach the kernels zero-copy through DLPack (no torch needed for that)."""
    env = {k: v for k, v in os.environ.items() if k not in ("EDGEQ_TVM_COMPILER", "TVM_USE_RUNTIME_LIB")}
    env["PYTHONPATH"] = str(REPO)
    code = ("import sys, numpy as np\n"
            "from edgeq.session import open_session\n"
            f"s = open_session({str(artifacts['tvm'])!r}, n_ctx=32)\n"
            "ids = list(s.generate_ids([1, 2, 3], 3, stop_at_eos=False))\n"
            "assert 'torch' not in sys.modules\n"
            "import tvm\n"
            "buf = np.zeros(128, np.uint8); a = buf[(-buf.ctypes.data) % 64:][:64].view(np.float32)\n"
            "t = tvm.runtime.from_dlpack(a); a[0] = 42.0\n"
            "assert t.numpy()[0] == 42.0  # shares the numpy buffer\n"
            "import torch\n"
            "assert torch.ones(2).sum().item() == 2.0\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
