"""The evaluation harness: perplexity / KL vs an independent transformers computation, LAMBADA
scoring on crafted sessions, and `edgeq eval` end to end on a tiny artifact."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq import evaluate
from edgeq.cli import main
from edgeq.errors import EdgeqError
from edgeq.frontend import load_adapter, load_model
from runtimes.base import Session
from runtimes.reference import ReferenceSession

REL = 1e-4


def _ids(n, vocab, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, n).tolist()


# ---- perplexity and KL vs transformers ---------------------------------------------------------
def _torch_stats(model_dir, adapter_dir, tokens, ctx):
    """NLL of the scored positions of `model+adapter`, KL(base ‖ model+adapter), top-1 agreement,
    computed with transformers/peft: torch forward of each window, float64 softmax."""
    import torch
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = [base(torch.tensor([tokens[w:w + ctx]])).logits[0].double()
                      for w in range(0, len(tokens) - ctx + 1, ctx)]
    art = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), adapter_dir).eval()
    first = ctx // 2
    nll, ref_nll, kls, agree = 0.0, 0.0, [], 0
    with torch.no_grad():
        for i, w in enumerate(range(0, len(tokens) - ctx + 1, ctx)):
            win = torch.tensor(tokens[w:w + ctx])
            lp = torch.log_softmax(art(win[None]).logits[0].double(), -1)[first - 1:ctx - 1]
            rlp = torch.log_softmax(ref_logits[i], -1)[first - 1:ctx - 1]
            tgt = win[first:]
            nll -= lp.gather(1, tgt[:, None]).sum().item()
            ref_nll -= rlp.gather(1, tgt[:, None]).sum().item()
            kls.append((rlp.exp() * (rlp - lp)).sum(-1))
            agree += (lp.argmax(-1) == rlp.argmax(-1)).sum().item()
    kl = torch.cat(kls).numpy()
    n = kl.size
    return {"ppl": np.exp(nll / n), "ref_ppl": np.exp(ref_nll / n), "mean_kl": kl.mean(),
            "p99_kl": np.percentile(kl, 99), "top1": agree / n, "count": n}


def test_perplexity_and_kl_match_transformers(tiny_llama, tiny_llama_lora):
    ctx, max_tokens = 128, 4 * 128
    base_ir = load_model(tiny_llama)
    tokens = _ids(max_tokens + 77, base_ir.hparams.vocab_size)  # a partial 5th window, dropped
    art = ReferenceSession(load_adapter(base_ir, tiny_llama_lora), n_ctx=ctx)
    ref = ReferenceSession(base_ir, n_ctx=ctx)
    res = evaluate.evaluate_wikitext(art, ref, tokens=tokens, ctx=ctx, max_tokens=None, progress=False)
    want = _torch_stats(tiny_llama, tiny_llama_lora, tokens[:max_tokens], ctx)

    assert res.perplexity.scored_tokens == res.kl.count == want["count"] == 4 * 64
    assert res.perplexity.windows == res.kl.windows == 4
    assert res.perplexity.ppl == pytest.approx(want["ppl"], rel=REL)
    assert res.reference_perplexity.ppl == pytest.approx(want["ref_ppl"], rel=REL)
    assert res.kl.mean_kl == pytest.approx(want["mean_kl"], rel=REL)
    assert res.kl.p99_kl == pytest.approx(want["p99_kl"], rel=REL)
    assert res.kl.top1_agreement == pytest.approx(want["top1"], abs=1e-9)
    assert 1e-3 < res.kl.mean_kl < res.kl.p99_kl <= res.kl.max_kl  # the adapter really changes outputs
    assert res.kl.top1_agreement < 1
    # the single-purpose entry points give the same numbers as the one-pass evaluation
    assert evaluate.perplexity(art, tokens, ctx=ctx, max_tokens=None, progress=False).ppl == res.perplexity.ppl
    kl = evaluate.kl_vs_reference(art, ref, tokens, ctx=ctx, max_tokens=None, progress=False)
    assert kl == res.kl
    # max_tokens truncates to whole windows
    assert evaluate.perplexity(art, tokens, ctx=ctx, max_tokens=3 * ctx + 5, progress=False).windows == 3


def test_kl_of_a_session_vs_itself_is_zero(tiny_qwen2):
    ir = load_model(tiny_qwen2)
    tokens = _ids(256, ir.hparams.vocab_size, seed=3)
    a, b = ReferenceSession(ir, n_ctx=64), ReferenceSession(ir, n_ctx=64)
    for ref in (a, b):
        kl = evaluate.kl_vs_reference(a, ref, tokens, ctx=64, max_tokens=None, progress=False)
        assert kl.count == 4 * 32
        assert abs(kl.mean_kl) < 1e-12 and abs(kl.p99_kl) < 1e-12
        assert kl.top1_agreement == 1.0


def test_too_few_tokens_and_vocab_mismatch_are_errors(tiny_llama, tiny_qwen2):
    a = ReferenceSession(load_model(tiny_llama), n_ctx=64)
    with pytest.raises(EdgeqError, match="at least 64 tokens"):
        evaluate.perplexity(a, [5] * 63, ctx=64, progress=False)

    class Wider(Session):
        name = "wider"

        def logits(self, ids):
            return np.zeros((len(ids), 500), np.float32)

    with pytest.raises(EdgeqError, match="vocabulary"):
        evaluate.kl_vs_reference(a, Wider(), [5] * 64, ctx=64, progress=False)


# ---- LAMBADA -----------------------------------------------------------------------------------
MERGED = 300  # the char-level tokenizer below merges "s " into one token


class MemorySession(Session):
    """Char-level tokenizer (ids = code points, "s " merged into one token) and a model that
    has memorised some token sequences: it predicts the next token of the first memorised
    sequence the context is a prefix of, else token 0."""

    name = "memory"

    def __init__(self, known_ids):
        self.known = [list(k) for k in known_ids]
        self.calls = 0

    def tokenize(self, text, add_special=True):
        ids, i = [], 0
        while i < len(text):
            if text[i:i + 2] == "s ":
                ids.append(MERGED)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids

    def logits(self, ids):
        self.calls += 1
        ids = list(ids)
        out = np.zeros((len(ids), 512), np.float32)
        for t in range(len(ids)):
            nxt = next((k[t + 1] for k in self.known if len(k) > t + 1 and k[:t + 1] == ids[:t + 1]), 0)
            out[t, nxt] = 1.0
        return out


def _write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_split_lambada():
    assert evaluate.split_lambada("he said hello to her") == ("he said hello to", " her")
    assert evaluate.split_lambada("a b  c.\n") == ("a b ", " c.")
    with pytest.raises(EdgeqError, match="without a context"):
        evaluate.split_lambada("word")


def test_lambada_exact_accuracy_on_crafted_items(tmp_path):
    tok = MemorySession([]).tokenize
    known = [tok("alpha beta gamma"),  # item 1 right
             tok("one two threx"),  # item 3: first target tokens right, the last one wrong
             tok("the cats") + tok(" sat"),  # item 4: split does not align -> fallback, right
             tok("zeta eta theta")]  # item 6 right
    items = ["alpha beta gamma", "alpha beta delta", "one two three", "the cats sat", "the cats ran",
             "zeta eta theta \n"]
    path = _write_jsonl(tmp_path / "lambada.jsonl", items)
    s = MemorySession(known)
    res = evaluate.lambada(s, path=path, progress=False)
    assert (res.correct, res.items, res.accuracy) == (3, 6, 0.5)
    assert res.fallback_items == 2  # "the cats sat" / "the cats ran": "s " merges across the boundary
    assert s.calls == 6  # one forward per item
    first3 = evaluate.lambada(s, path=path, limit=3, progress=False)
    assert (first3.correct, first3.items, first3.limit) == (1, 3, 3)


def test_lambada_item_ids_alignment(tmp_path):
    s = MemorySession([])
    ids, n, fell_back = evaluate.lambada_item_ids(s, "a dog", " ran")
    assert (ids, n, fell_back) == (s.tokenize("a dog ran"), 4, False)
    ids, n, fell_back = evaluate.lambada_item_ids(s, "two cats", " ran")
    assert (ids, n, fell_back) == (s.tokenize("two cats") + s.tokenize(" ran"), 4, True)


def test_teacher_forced_check_equals_greedy_decoding(tiny_llama):
    s = ReferenceSession(load_model(tiny_llama), n_ctx=128)
    for seed in range(3):
        ctx_ids = _ids(20, s.hp.vocab_size, seed=seed)
        greedy = list(s.generate_ids(ctx_ids, 4, stop_at_eos=False))
        assert evaluate.lambada_item_correct(s, ctx_ids + greedy, 4)
        for j in range(4):  # any target token that is not the greedy one fails the item
            wrong = list(greedy)
            wrong[j] = (wrong[j] + 1) % s.hp.vocab_size
            assert not evaluate.lambada_item_correct(s, ctx_ids + wrong, 4)


def test_lambada_missing_data_names_edgeq_data(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQ_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(EdgeqError, match="EDGEQ_DATA"):
        evaluate.lambada(MemorySession([]), progress=False)
    with pytest.raises(EdgeqError, match="EDGEQ_DATA"):
        evaluate.wikitext2_test_text()


# ---- the CLI -----------------------------------------------------------------------------------
def run_cli(*args, env=None):
    r = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    return r.exit_code, r.output


def one_line_error(text):
    """The failure is reported as exactly one `error: ...` line (progress lines may precede it)."""
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in text, text
    return errors[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small stand-in for ../shared/data: CRLF wikitext rows (some empty) + LAMBADA items."""
    from models.tiny import TINY_CORPUS

    root = tmp_path_factory.mktemp("data")
    rows = [ln for ln in TINY_CORPUS.splitlines()] * 4
    wt = root / "wikitext-2-raw" / "wiki.test.raw"
    wt.parent.mkdir(parents=True)
    wt.write_bytes("\r\n".join(rows + [""]).encode("utf-8"))
    _write_jsonl(root / "lambada" / "lambada_test.jsonl",
                 ["the robot walked to the harbour", "the capital of France is Paris",
                  "a spider has eight legs", "the moon is bright"])
    return root


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    import llama_cpp  # noqa: F401
    out = tmp_path_factory.mktemp("art") / "q8"
    code, text = run_cli("build", tiny_llama, "--bits", "8", "-o", out)
    assert code == 0, text
    return out


def test_eval_cli_writes_json(artifact, data_dir, tmp_path, tiny_llama):
    out = tmp_path / "eval.json"
    code, text = run_cli("eval", artifact, "--ppl-tokens", 1024, "--limit", 3, "--json", out,
                         env={"EDGEQ_DATA": str(data_dir)})
    assert code == 0, text
    r = json.loads(out.read_text())
    assert r["kind"] == "artifact" and r["runtime"] == "llama.cpp" and r["weight_type"] == "Q8_0"
    assert r["tasks"] == ["wikitext", "kl", "lambada"]
    w, k, la = r["wikitext"], r["kl"], r["lambada"]
    assert {"ppl", "nll", "scored_tokens", "windows", "ctx", "seconds"} <= set(w)
    assert (w["windows"], w["scored_tokens"], w["ctx"]) == (2, 512, 512)
    assert 1 < w["ppl"] < 1e4 and k["reference_ppl"] == pytest.approx(w["ppl"], rel=0.05)
    assert {"mean_kl", "p99_kl", "top1_agreement", "count", "reference", "reference_ppl"} <= set(k)
    assert k["count"] == 512 and k["reference"]["path"] == str(tiny_llama)
    assert 0 <= k["mean_kl"] < 0.01 and k["top1_agreement"] > 0.9  # Q8_0 vs fp32
    assert {"accuracy", "correct", "items", "fallback_items", "limit"} <= set(la)
    assert la["items"] == 3 and la["limit"] == 3 and 0 <= la["accuracy"] <= 1
    assert "perplexity" in text and "top-1 agreement" in text and "accuracy" in text


def test_eval_cli_source_model_reference_runtime(tiny_llama, data_dir, tmp_path):
    out = tmp_path / "eval.json"
    code, text = run_cli("eval", tiny_llama, "--tasks", "kl,wikitext", "--reference", tiny_llama,
                         "--ppl-tokens", 512, "--json", out, env={"EDGEQ_DATA": str(data_dir)})
    assert code == 0, text
    r = json.loads(out.read_text())
    assert r["kind"] == "model" and r["runtime"] == "reference" and "lambada" not in r
    assert abs(r["kl"]["mean_kl"]) < 1e-12 and r["kl"]["top1_agreement"] == 1.0
    assert r["kl"]["reference_ppl"] == pytest.approx(r["wikitext"]["ppl"], rel=1e-12)


@pytest.mark.parametrize("args, message", [
    (["--tasks", "kl"], "--reference"),  # a source model has no reference by default
    (["--tasks", "bleu"], "unknown task"),
    (["--prune", "0.5"], "pruning rate 0.5"),  # the tiny model carries no pruning rates
])
def test_eval_cli_errors_are_one_line(tiny_llama, data_dir, args, message):
    code, text = run_cli("eval", tiny_llama, *args, env={"EDGEQ_DATA": str(data_dir)})
    assert code == 1 and message in one_line_error(text)


def test_eval_cli_prune_rate_must_be_carried(artifact, data_dir):
    code, text = run_cli("eval", artifact, "--prune", "0.25", env={"EDGEQ_DATA": str(data_dir)})
    assert code == 1 and "pruning rate 0.25 is not carried" in one_line_error(text)


def test_eval_cli_prune_needs_a_session_with_rates():
    from edgeq.eval_cmd import _set_prune

    with pytest.raises(EdgeqError, match="cannot switch pruning rates"):
        _set_prune(MemorySession([]), 0.5)


def test_eval_cli_missing_data_dir_is_a_one_line_error(tiny_llama, tmp_path):
    code, text = run_cli("eval", tiny_llama, env={"EDGEQ_DATA": str(tmp_path / "absent")})
    assert code == 1 and text.count("\n") == 1  # fails before loading anything
    assert "EDGEQ_DATA" in one_line_error(text) and "not found" in text


# ---- the real model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_reference_lambada_first_50(smollm2_dir):
    path = evaluate.resolve_data_dir() / "lambada" / "lambada_test.jsonl"
    if not path.exists():
        pytest.fail(f"{path} not found (set EDGEQ_DATA to the shared data directory)", pytrace=False)
    s = ReferenceSession(load_model(smollm2_dir), n_ctx=512)
    res = evaluate.lambada(s, path=path, limit=50, progress=False)
    assert res.items == 50
    assert 0 < res.accuracy < 1


@pytest.mark.parametrize("fmt", ["gguf", "reference"])
def test_eval_cli_at_pruning_rates(fmt, tiny_llama, data_dir, tmp_path):
    """A pruned artifact is scored at each carried rate vs the unpruned fp32 source."""
    import llama_cpp  # noqa: F401

    if not (evaluate.resolve_data_dir() / "alpaca").exists():
        pytest.fail("calibration data (../shared/data/alpaca) not found (set EDGEQ_DATA)", pytrace=False)
    art = tmp_path / "pruned"
    bits = ["--bits", "8"] if fmt == "gguf" else []
    code, text = run_cli("build", tiny_llama, "--format", fmt, *bits, "--prune-rates", "0,0.5",
                         "--calib-samples", 4, "--calib-len", 64, "-o", art)
    assert code == 0, text
    kls = {}
    for rate in ("0", "0.5"):
        out = tmp_path / f"eval-{rate}.json"
        code, text = run_cli("eval", art, "--prune", rate, "--tasks", "wikitext,kl", "--ppl-tokens", 512,
                             "--json", out, env={"EDGEQ_DATA": str(data_dir)})
        assert code == 0, text
        r = json.loads(out.read_text())
        assert r["prune_rate"] == float(rate) and r["kl"]["reference"]["path"] == str(tiny_llama)
        kls[rate] = r["kl"]["mean_kl"]
    assert kls["0"] < 0.01 < kls["0.5"]
