"""Helpers of the ``edgeq build --prune-rates`` CLI tests (tests/test_build_prune*.py): the CLI in
this process, and the checks those files share. (Importable as ``prune_cli``: tests/conftest.py
puts this directory on sys.path.)"""
from __future__ import annotations

from click.testing import CliRunner

from edgeq.cli import main
from edgeq.passes.rate_plan import rate_tolerance, realised_rate

CALIB = ["--calib-samples", "4", "--calib-len", "64"]


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


def assert_goldens_verify_at_every_rate(artifact, n_rates: int = 3) -> None:
    """``edgeq verify`` passes and checks the recorded goldens of each of the ``n_rates`` rates."""
    code, text = run_cli("verify", artifact)
    assert code == 0, text
    assert text.count("regression vs recorded goldens") == n_rates


def build_twice_identically(model, tmp_path, name: str, args) -> list:
    """``edgeq build model *args`` twice (into ``tmp_path/<name>0`` and ``<name>1``): both succeed and
    every file of the first is byte-identical in the second; the two artifact paths."""
    outs = []
    for i in range(2):
        out = tmp_path / f"{name}{i}"
        code, text = run_cli("build", model, *args, "-o", out)
        assert code == 0, text
        outs.append(out)
    for f in sorted(p.name for p in outs[0].iterdir()):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    return outs


def assert_one_line_build_errors(model, tmp_path, cases) -> None:
    """Each ``(args, msg)`` of ``cases``: ``edgeq build model --format reference *args`` fails with ``msg`` in one
    ``error`` line, no traceback, and leaves no artifact behind."""
    for args, msg in cases:
        out = tmp_path / "o"
        code, text = run_cli("build", model, "--format", "reference", *args, *CALIB, "-o", out)
        assert code != 0, (args, text)
        assert msg in text and "Traceback" not in text, (args, text)
        assert sum(line.lower().startswith("error") for line in text.splitlines()) == 1, text
        assert not out.exists()


def assert_mlp_only_nested_on_budget(spec, hp, qk_pairs: int, v_dims: int) -> None:
    """Every rate's widths keep all ``qk_pairs`` / ``v_dims`` (MLP-only pruning), realise the rate
    within half the granularity's tolerance, and nest (a higher rate's MLP widths are no wider)."""
    prev = None
    for r in spec.rates:
        ws = spec.widths[r]
        assert all(w.qk_pairs == qk_pairs and w.v_dims == v_dims for w in ws)  # MLP only
        assert abs(realised_rate(hp, ws) - r) <= rate_tolerance(hp, spec.granularity) / 2 + 1e-12
        if prev is not None:
            assert all(a.ffn <= b.ffn for a, b in zip(ws, prev))
        prev = ws
