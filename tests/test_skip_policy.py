"""The skip policy (issue 18): a run with a skip outside tests/skip_allowlist.py fails, so a
broken install cannot turn CI green by skipping the tests that need what it failed to install.

Each case runs pytest in a fresh process on a scratch test directory that has this suite's
conftest.py and allowlist, and checks the exit status.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

CASES = {
    # name: (test module source, whether the run passes)
    "pass": ("def test_ok():\n    pass\n", True),
    "allowed-skip": ("import pytest\n\ndef test_x():\n    pytest.skip('host has no AVX-512: compiled, not run')\n", True),
    "other-skip": ("import pytest\n\ndef test_x():\n    pytest.skip('gpu not found')\n", False),
    "importorskip": ("import pytest\npytest.importorskip('edgeq_no_such_module')\n\ndef test_x():\n    pass\n", False),
    "skipif": ("import pytest\n\n@pytest.mark.skipif(True, reason='flaky')\ndef test_x():\n    pass\n", False),
    "xpass": ("import pytest\n\n@pytest.mark.xfail(reason='known bug')\ndef test_x():\n    pass\n", False),
    "xfail": ("import pytest\n\n@pytest.mark.xfail(reason='known bug')\ndef test_x():\n    assert False\n", True),
    "unknown-marker": ("import pytest\n\n@pytest.mark.sloww\ndef test_x():\n    pass\n", False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_skip_policy(case, tmp_path):
    src, want = CASES[case]
    d = tmp_path / "suite"
    (d / "tests").mkdir(parents=True)
    for name in ("conftest.py", "skip_allowlist.py"):
        shutil.copyfile(HERE / name, d / "tests" / name)
    # the project's pytest settings (strict markers/config, xfail_strict), not the scratch dir's
    shutil.copyfile(HERE.parent / "pyproject.toml", d / "pyproject.toml")
    (d / "tests" / "test_case.py").write_text(src)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=d,
                       capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) is want, r.stdout + r.stderr
    if case in ("other-skip", "importorskip", "skipif"):
        assert "skips outside tests/skip_allowlist.py" in r.stdout
