"""Chat templates: rendering a single user turn (sandboxed jinja2: a template is untrusted input)
and choosing one at build time (``edgeq build --chat-template NAME|FILE``).

A base model (Gemma 3 270M's release) ships no template, so ``edgeq run`` has nothing to wrap a
prompt in; a model fine-tuned into a chat model needs the turn format it was tuned on. A build
attaches one: a file (a Hugging Face style jinja template: ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception``) or a built-in name (:data:`BUILTIN`, written
here: ``chatml``, ``gemma``). It replaces the checkpoint's template in every format (GGUF
``tokenizer.chat_template``, the other formats' tokenizer spec) and is checked before the build
runs: it must parse and render a user turn, and a built-in's turn markers must be single tokens of
the model's vocabulary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from edgeq.errors import EdgeqError

MAX_BYTES = 64 * 1024  # a chat template file is text of a few KB

# name -> (template, the special tokens it writes, which the vocabulary must hold as single tokens).
# The prompt is tokenized with the model's own BOS rule (add_bos), so the templates do not write BOS.
BUILTIN: dict[str, tuple[str, tuple[str, ...]]] = {
    # ChatML (<|im_start|>role ... <|im_end|>): SmolLM2, Qwen2
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
               ("<|im_start|>", "<|im_end|>")),
    # Gemma's turns (<start_of_turn>user / model ... <end_of_turn>); Gemma has no system role: a system
    # message is put before the first user message's text
    "gemma": ("{% set ns = namespace(system='') %}{% for m in messages %}"
              "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
              "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
              "{{ ns.system if m['role'] == 'user' else '' }}{{ m['content'] | trim }}<end_of_turn>\n"
              "{% if m['role'] == 'user' %}{% set ns.system = '' %}{% endif %}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
              ("<start_of_turn>", "<end_of_turn>")),
}


def render(template: str, prompt: str, bos_token: str = "", eos_token: str = "") -> str:
    """A single user turn rendered with ``template`` (sandboxed; generation prompt on)."""
    return render_messages(template, [{"role": "user", "content": prompt}], bos_token, eos_token)


def render_messages(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "",
                    add_generation_prompt: bool = True) -> str:
    """``messages`` ({"role", "content"} dicts) rendered with ``template`` (sandboxed; with the
    generation prompt unless ``add_generation_prompt`` is false: a finished conversation)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise EdgeqError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token)
    except TemplateError as exc:
        raise EdgeqError(f"chat template: {exc}") from None


def resolve(value: str) -> str:
    """The template text of ``--chat-template``: a built-in name, or a file of jinja text."""
    if value in BUILTIN:
        return BUILTIN[value][0]
    path = Path(value)
    if not path.is_file():
        raise EdgeqError(f"--chat-template: {value!r} is neither a built-in template ({', '.join(BUILTIN)}) "
                         "nor a file")
    if path.stat().st_size > MAX_BYTES:
        raise EdgeqError(f"--chat-template: {path} is over {MAX_BYTES // 1024} KB; a chat template is a few KB of text")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgeqError(f"--chat-template: {path} is not UTF-8 text") from None


def check(value: str, template: str, tokens: Sequence[str] | None = None) -> None:
    """Refuse a template that does not render a user turn, or a built-in whose turn markers are not
    tokens of this vocabulary (``tokens``: the model's token strings; None: not checked yet)."""
    out = render(template, "hello")
    if "hello" not in out:
        raise EdgeqError(f"--chat-template {value}: the rendered turn does not contain the user's message")
    if value in BUILTIN and tokens is not None:
        vocab = set(tokens)
        missing = [t for t in BUILTIN[value][1] if t not in vocab]
        if missing:
            raise EdgeqError(f"--chat-template {value}: {', '.join(missing)} not in this model's vocabulary "
                             "(the template is for another model family)")
