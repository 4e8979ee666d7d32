"""Train a real LoRA adapter (PEFT) on Alpaca records — the fine-tuned input edgeq deploys.

Each record becomes a chat: user = instruction (+ blank line + input, when present),
assistant = output, rendered with the model's own chat template. The loss is taken on the
assistant tokens only (everything after the generation prompt, ``<|im_end|>`` included).

Writes a PEFT adapter directory (adapter_config.json, adapter_model.safetensors) plus
train_log.json (loss per step, seconds, seconds/step) and the recipe marker, atomically.
Deterministic for a given seed, thread count and library versions.

Usage (from the repository root)::

    python -m models.train_lora --model models/cache/smollm2-135m-instruct \\
        --out models/cache/smollm2-alpaca-lora --steps 200
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from edgeq.errors import EdgeqError, require
from models import CACHE_DIR, atomic_dir, canonicalise_adapter_config, read_marker, run_main, write_json, write_marker

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/alpaca/alpaca_small.json"
DEFAULT_MODEL = CACHE_DIR / "smollm2-135m-instruct"
DEFAULT_OUT = CACHE_DIR / "smollm2-alpaca-lora"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100
RECIPE = "train-lora/v1"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 2e-4
    warmup_steps: int = 10  # linear warmup, then linear decay to 0
    weight_decay: float = 0.0
    batch_size: int = 4  # sequences per optimizer step = batch_size * grad_accum
    grad_accum: int = 1
    max_len: int = 256
    seed: int = 0
    threads: int = 2
    target_modules: tuple[str, ...] = field(default=LORA_TARGETS)

    def __post_init__(self):
        for name in ("steps", "r", "batch_size", "grad_accum", "max_len", "threads"):
            if getattr(self, name) < 1:
                raise EdgeqError(f"{name}: expected >= 1, got {getattr(self, name)}")


def load_alpaca(path: Path) -> list[dict[str, str]]:
    """Alpaca records (instruction, input, output) from a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(f"Alpaca data not found at {path}; expected a JSON list of "
                         f"{{instruction, input, output}} records (pass --data PATH)")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise EdgeqError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(records, list) or not records:
        raise EdgeqError(f"{path}: expected a non-empty JSON list of records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str) \
                or not isinstance(rec.get("output"), str):
            raise EdgeqError(f"{path}: record {i}: expected instruction and output strings, got {rec!r:.200}")
    return records


def alpaca_messages(rec: dict[str, str]) -> list[dict[str, str]]:
    user = rec["instruction"].strip()
    if (extra := (rec.get("input") or "").strip()):
        user = f"{user}\n\n{extra}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"].strip()}]


def _template_ids(tokenizer, messages, add_generation_prompt: bool, template: str | None = None) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's own chat template, or by ``template``
    (edgeq.chat_template's text: rendered there, then tokenized with the tokenizer's own BOS rule,
    as edgeq's runtimes feed a templated prompt)."""
    if template is not None:
        from edgeq.chat_template import render_messages

        text = render_messages(template, messages, add_generation_prompt=add_generation_prompt)
        return list(tokenizer(text)["input_ids"])
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                        return_dict=True)
    return list(out["input_ids"])


def encode_example(tokenizer, rec: dict[str, str], max_len: int,
                   template: str | None = None) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) with labels = IGNORE_INDEX on the prompt; None if no answer token fits.
    ``template``: a chat template's text instead of the tokenizer's own (:func:`_template_ids`)."""
    messages = alpaca_messages(rec)
    prompt = _template_ids(tokenizer, messages[:1], True, template)
    full = _template_ids(tokenizer, messages, False, template)
    if full[:len(prompt)] != prompt:
        raise EdgeqError("chat template: the rendered conversation does not start with the rendered "
                         "generation prompt; cannot mask the prompt tokens")
    full = full[:max_len]
    if len(full) <= len(prompt):
        return None
    return full, [IGNORE_INDEX] * len(prompt) + full[len(prompt):]


def _collate(examples, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return ids, mask, labels


def _config_digest(cfg: TrainConfig, model_dir: Path, data: Path, template: str | None = None) -> str:
    """Identifies a training run: config + sha256 of the base weights' marker/config + data (+ the
    chat template's text when one replaces the tokenizer's own)."""
    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    if template is not None:
        h.update(b"chat-template\0" + template.encode())
    for p in (model_dir / "config.json", model_dir / ".edgeq-recipe.json", data):
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def train_lora(model_dir: Path = DEFAULT_MODEL, out_dir: Path = DEFAULT_OUT, *, data: Path = DEFAULT_DATA,
               config: TrainConfig = TrainConfig(), force: bool = False, progress: bool = True,
               chat_template: str | None = None) -> Path:
    """Fine-tune a LoRA adapter for the checkpoint at ``model_dir``; write it to ``out_dir``.

    ``chat_template``: a built-in name or a file (edgeq.chat_template, as ``edgeq build
    --chat-template``) for a checkpoint whose tokenizer has none (a base model, e.g. Gemma 3 270M).

    Skips (returns at once) when ``out_dir`` holds a complete run of the same config, base
    model and data, unless ``force``.
    """
    torch = require("torch", "frontend")
    require("transformers", "frontend")
    require("peft", "frontend")
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out_dir, data = Path(model_dir), Path(out_dir), Path(data)
    if not (model_dir / "config.json").is_file():
        raise EdgeqError(f"{model_dir}: expected a Hugging Face checkpoint directory (config.json), "
                         f"e.g. from: python -m models.smollm2")
    template = None
    if chat_template is not None:
        from edgeq.chat_template import resolve

        template = resolve(chat_template)
    records = load_alpaca(data)
    digest = _config_digest(config, model_dir, data, template)
    if not force and (info := read_marker(out_dir)) is not None and info.get("digest") == digest:
        print(f"train_lora: {out_dir} already holds this run; skipping")
        return out_dir

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise EdgeqError(f"{model_dir}: tokenizer has neither a pad nor an eos token")
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise EdgeqError(f"{model_dir}: the tokenizer has no chat template; give one with --chat-template "
                         "(chatml, gemma or a file)")
    examples = [ex for rec in records
                if (ex := encode_example(tokenizer, rec, config.max_len, template)) is not None]
    if not examples:
        raise EdgeqError(f"{data}: no record leaves an answer token within max_len {config.max_len}")
    print(f"train_lora: {len(examples)}/{len(records)} records from {data}; "
          f"{sum(len(x) for x, _ in examples) / len(examples):.0f} tokens/record on average")

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base.config.use_cache = False
    lora = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"train_lora: LoRA r={config.r} alpha={config.alpha} on {list(config.target_modules)}: "
          f"{n_train / 1e6:.2f}M trainable parameters")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, max(config.steps // 10, 1))

    def lr_factor(step: int) -> float:  # step counts from 0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(config.seed)
    order: list[int] = []

    def next_example():
        nonlocal order
        if not order:  # a fresh seeded shuffle per epoch
            order = torch.randperm(len(examples), generator=gen).tolist()
        return examples[order.pop()]

    losses: list[float] = []
    step_seconds: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(range(config.steps), desc="train_lora", disable=not progress, dynamic_ncols=True)
    for step in bar:
        t_step = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(config.grad_accum):
            ids, mask, labels = _collate([next_example() for _ in range(config.batch_size)], pad_id)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            (out.loss / config.grad_accum).backward()
            step_loss += out.loss.item() / config.grad_accum
            tokens += int(mask.sum())
        if not math.isfinite(step_loss):
            raise EdgeqError(f"train_lora: loss is {step_loss} at step {step}")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(round(step_loss, 6))
        step_seconds.append(round(time.perf_counter() - t_step, 3))
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    seconds = time.perf_counter() - t0
    bar.close()

    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model card; not needed
        canonicalise_adapter_config(tmp / "adapter_config.json")
        write_json(tmp / "train_log.json", {
            "config": asdict(config),
            "base_model": str(model_dir),
            "data": str(data),
            "chat_template": chat_template,
            "records_used": len(examples),
            "steps": config.steps,
            "sequences_per_step": config.batch_size * config.grad_accum,
            "tokens_seen": tokens,
            "seconds": round(seconds, 3),
            "seconds_per_step": round(seconds / config.steps, 4),
            "seconds_per_step_median": sorted(step_seconds)[len(step_seconds) // 2],
            "loss": losses,
            "step_seconds": step_seconds,
            "loss_first10_mean": round(sum(losses[:10]) / len(losses[:10]), 4),
            "loss_last10_mean": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        })
        write_marker(tmp, {"recipe": RECIPE, "digest": digest})
    print(f"train_lora: {config.steps} steps in {seconds:.1f} s ({seconds / config.steps:.2f} s/step); "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; wrote {out_dir}")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="python -m models.train_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help=f"base checkpoint (default {DEFAULT_MODEL})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"adapter directory (default {DEFAULT_OUT})")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"Alpaca JSON (default {DEFAULT_DATA})")
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--r", type=int, default=d.r)
    ap.add_argument("--alpha", type=int, default=d.alpha)
    ap.add_argument("--dropout", type=float, default=d.dropout)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--grad-accum", type=int, default=d.grad_accum)
    ap.add_argument("--max-len", type=int, default=d.max_len)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--target-modules", default=",".join(d.target_modules),
                    help="comma-separated module names")
    ap.add_argument("--chat-template", default=None,
                    help="chatml, gemma or a jinja file, for a tokenizer without its own template (a base model)")
    ap.add_argument("--force", action="store_true", help="retrain even if the output holds this run")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    def body() -> None:
        cfg = TrainConfig(steps=args.steps, r=args.r, alpha=args.alpha, dropout=args.dropout, lr=args.lr,
                          batch_size=args.batch_size, grad_accum=args.grad_accum, max_len=args.max_len,
                          seed=args.seed, threads=args.threads,
                          target_modules=tuple(m for m in args.target_modules.split(",") if m))
        train_lora(args.model, args.out, data=args.data, config=cfg, force=args.force,
                   progress=not args.no_progress, chat_template=args.chat_template)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
