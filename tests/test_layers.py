"""Import layers: the import-linter contracts of pyproject.toml ([tool.importlinter]) hold, and
they fail when the code breaks them (docs/architecture.md, "Layers")."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")
pytest.importorskip("importlinter")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "pyproject.toml"
# what runtimes/ (the device side) may import from edgeq: the neutral core
CORE = {"edgeq", "edgeq.errors", "edgeq.interrupts", "edgeq.ir", "edgeq.artifact", "edgeq.hashing", "edgeq.chat_template",
        "edgeq.tokenizer_pack",  # the packed-vocabulary file format (written by lowerings, read by sessions)
        "edgeq.frontend.safetensors_io"}  # the safetensors reader: core, still under frontend/
COMPILER_ONLY_DEPS = {"torch", "transformers", "peft", "onnx", "gguf", "matplotlib"}


def lint(root: Path, config: Path, *contracts: str) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root`` (run there, first on the path)."""
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                           "import sys; from importlinter.cli import lint_imports_command as c; "
                                           "sys.exit(c())"]
    cmd += ["--config", str(config), "--no-cache"]
    for c in contracts:
        cmd += ["--contract", c]
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_hold():
    r = lint(REPO, CONFIG)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def _copy_tree(dst: Path) -> Path:
    for pkg in ("edgeq", "runtimes"):
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    shutil.copy(CONFIG, dst / "pyproject.toml")
    return dst


@pytest.mark.parametrize("module, bad_import, contract", [
    # the regression issue 13 names: a runtime reading the tokenizer through the ONNX lowering
    ("runtimes/tvmrt.py", "from edgeq.backends.onnx.lower import OnnxOptions", "runtimes"),
    ("runtimes/reference.py", "from edgeq.frontend import load_model", "runtimes"),
    ("edgeq/ir.py", "from edgeq.quant.formats import QType", "layers"),
    ("edgeq/backends/tvm/lower.py", "from edgeq.backends.onnx.lower import OnnxOptions", "lowerings"),
    ("edgeq/quant/codecs.py", "from edgeq.quant.reference import quantize", "quant"),
])
def test_a_bad_import_breaks_its_contract(tmp_path, module, bad_import, contract):
    root = _copy_tree(tmp_path)
    assert lint(root, root / "pyproject.toml", contract).returncode == 0  # the copy is clean
    p = root / module
    p.write_text(p.read_text(encoding="utf-8") + f"\n{bad_import}  # noqa: E402\n", encoding="utf-8")
    r = lint(root, root / "pyproject.toml", contract)
    assert r.returncode != 0, r.stdout
    assert "BROKEN" in r.stdout and bad_import.split()[1] in r.stdout


def test_runtimes_import_only_the_core():
    """An allow-list (the forbidden contract names what exists today; a new edgeq package is
    caught here too)."""
    sys_path = list(sys.path)
    sys.path.insert(0, str(REPO))
    try:
        g = grimp.build_graph("edgeq", "runtimes", include_external_packages=True, cache_dir=None)
    finally:
        sys.path[:] = sys_path
    bad = set()
    for m in g.modules:
        if m == "runtimes" or m.startswith("runtimes."):
            for d in g.find_modules_directly_imported_by(m):
                root = d.split(".")[0]
                if (root == "edgeq" and d not in CORE) or root in COMPILER_ONLY_DEPS:
                    bad.add(f"{m} -> {d}")
    assert not bad, sorted(bad)


def test_no_module_imports_another_modules_private_names():
    """A name another module needs is public in the module that owns it (or in a shared module)."""
    import ast

    bad = []
    for path in sorted([*REPO.glob("edgeq/**/*.py"), *REPO.glob("runtimes/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("edgeq", "runtimes"):
                bad += [f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
