"""`edgeq verify`: hashes + rerun the artifact against its recorded goldens."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeq import goldens, reference_check, tolerances
from edgeq.artifact import artifact_path, check_files, read_manifest
from edgeq.backends import for_manifest
from edgeq.errors import EdgeqError
from edgeq.session import open_session


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # checks that could not judge (not failures)
    regression: dict | None = None  # rate -> artifact now vs artifact goldens
    reference: dict | None = None  # rate -> artifact now vs fp32 reference goldens (same rate)
    tolerance: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return self.__dict__


def verify(artifact_dir: str | Path, runtime: str = "auto") -> VerifyReport:
    root = Path(artifact_dir)
    m = read_manifest(root)
    problems = check_files(root, m)
    rep = VerifyReport(ok=False, problems=problems)
    if problems:  # never run files that do not match the manifest
        return rep
    g = m.get("goldens")
    if not g:
        device = for_manifest(m).device(m)
        if device is not None and m.get("target"):
            rep.problems.append(f"files match the manifest; the {m['target']} build ({device}) carries no goldens: "
                                "run and verify it on that device")
        else:
            rep.problems.append("artifact was built without goldens (--no-goldens)")
        return rep
    if not isinstance(g, dict) or "file" not in g:
        raise EdgeqError(f"{root / 'manifest.json'}: corrupt goldens entry")
    gpath = artifact_path(root, g["file"])
    data = goldens.load_goldens(gpath)
    token_ids, per_rate = data["token_ids"], data["rates"]
    tol = tolerances.REFERENCE_TOLERANCE.get(m.get("weight_type", ""))
    rep.tolerance = {"regression_max_logprob_diff": tolerances.REGRESSION_MAX_LOGPROB_DIFF,
                     "regression_min_top1": tolerances.REGRESSION_MIN_TOP1}
    if tol is not None:
        rep.tolerance.update({"reference_max_mean_kl": tol.max_mean_kl, "reference_min_top1": tol.min_top1,
                              "reference_max_relative_kl": tol.max_relative_kl,
                              "reference_top1_clear_margin": tolerances.TOP1_CLEAR_MARGIN,
                              "reference_top1_min_clear_positions": tolerances.TOP1_MIN_CLEAR_POSITIONS})
    rep.regression, rep.reference = {}, {}
    options = g.get("session_options") or {}  # how the goldens ran the artifact (e.g. llama.cpp's repack)
    if not isinstance(options, dict):
        raise EdgeqError(f"{root / 'manifest.json'}: corrupt goldens entry (session_options)")
    for key, expected in per_rate.items():
        with open_session(root, runtime=runtime, n_ctx=256, manifest=m, prune=float(key), options=options) as s:
            lps = goldens.logprobs(s, token_ids)
        reg = goldens.compare(expected["artifact"], lps, where=str(gpath))
        ref = goldens.compare(expected["reference"], lps, clear_margin=tolerances.TOP1_CLEAR_MARGIN, where=str(gpath))
        rep.regression[key], rep.reference[key] = reg.to_json(), ref.to_json()
        at = f"rate {key}: " if len(per_rate) > 1 else ""
        if reg.top1_agreement < tolerances.REGRESSION_MIN_TOP1:
            rep.problems.append(f"{at}regression: top-1 agreement {reg.top1_agreement:.4f} < "
                                f"{tolerances.REGRESSION_MIN_TOP1} vs recorded goldens")
        if reg.max_logprob_diff > tolerances.REGRESSION_MAX_LOGPROB_DIFF:
            rep.problems.append(f"{at}regression: max |Δ log-prob| {reg.max_logprob_diff:.3g} > "
                                f"{tolerances.REGRESSION_MAX_LOGPROB_DIFF} vs recorded goldens")
        if tol is not None:
            probs, note = reference_check.check(ref, tol, expected.get("reference_floor"), at,
                                                f"for {m.get('weight_type')}")
            rep.problems += probs
            rep.notes += [note] if note else []
    rep.ok = not rep.problems
    return rep

