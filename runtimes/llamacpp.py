"""llama.cpp runtime: a Session over llama-cpp-python (no torch).

Model loading, tokenization and the chat template come from llama-cpp-python's ``Llama``
object; evaluation goes through llama.cpp's low-level batch API so that ``logits`` can ask for
every position's logits without the high-level wrapper's ``n_ctx x n_vocab`` score buffer.
LoRA-adapter GGUFs (``edgeq.backends.gguf.lower.write_lora_gguf``) are attached with
``llama_adapter_lora_init`` + ``llama_set_adapters_lora``, so any number can be stacked.
"""
from __future__ import annotations

import contextlib
import ctypes
from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.chat_template import render
from edgeq.errors import EdgeqError, require
from edgeq.interrupts import no_raise_here
from runtimes.base import Session, check_last


_LOG_TAIL: deque[tuple[int, str]] = deque(maxlen=32)  # recent llama.cpp (level, line), warn/error
_LOG_CB = None  # the installed ctypes callback (kept referenced)


def _silence_llama_log(llama_cpp) -> None:
    """Route llama.cpp/ggml logging into ``_LOG_TAIL`` instead of stderr (process-wide; the
    stock llama-cpp-python callback prints to stderr). Error messages are quoted from there."""
    global _LOG_CB
    if _LOG_CB is not None:
        return

    @llama_cpp.llama_log_callback
    @no_raise_here  # a Ctrl-C raised in here would be dropped by ctypes (edgeq.interrupts)
    def _cb(level, text, user_data):  # noqa: ARG001
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR (ggml.h numbering)
            _LOG_TAIL.append((int(level), text.decode("utf-8", errors="replace").strip()))

    _LOG_CB = _cb
    llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))


def _last_log(default: str = "") -> str:
    """The first error line logged since the last ``_LOG_TAIL.clear()`` (the root cause;
    llama.cpp logs the consequences after it), else ``default``."""
    errors = [ln for lvl, ln in _LOG_TAIL if lvl == 4 and ln]
    return errors[0] if errors else default


@contextlib.contextmanager
def _model_params(llama_cpp, **fields):
    """Model parameters ``llama_cpp.Llama`` does not take as arguments (``use_extra_bufts``: the CPU
    repack of Q4_0 / IQ4_NL weights into a second, interleaved copy), set on the defaults it
    starts from while one model is created."""
    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def params():
        p = default()
        for k, v in fields.items():
            setattr(p, k, v)
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


class LlamaCppSession(Session):
    name = "llama.cpp"

    def __init__(self, model_path: str | Path, lora_paths: Sequence[str | Path] = (), n_ctx: int = 2048,
                 n_threads: int = 2, seed: int = 0, lora_scales: Sequence[float] | None = None,
                 n_batch: int = 512, kv_cache_type: str = "f16", verbose: bool = False, repack: bool = True):
        llama_cpp = require("llama_cpp", "gguf")
        self._lib = llama_cpp
        self._batch = None
        self._adapters: list = []
        self._llm = None
        if not verbose:
            _silence_llama_log(llama_cpp)
        _LOG_TAIL.clear()
        model_path = Path(model_path)
        if not model_path.is_file():
            raise EdgeqError(f"{model_path}: no such GGUF file")
        lora_paths = [Path(p) for p in lora_paths]
        for p in lora_paths:
            if not p.is_file():
                raise EdgeqError(f"{p}: no such LoRA adapter file")
        scales = [1.0] * len(lora_paths) if lora_scales is None else [float(s) for s in lora_scales]
        if len(scales) != len(lora_paths):
            raise EdgeqError(f"expected {len(lora_paths)} LoRA scales, got {len(scales)}")
        kv_types = {"f32": 0, "f16": 1, "q8_0": 8}  # enum ggml_type
        if kv_cache_type not in kv_types:
            raise EdgeqError(f"expected kv_cache_type in {sorted(kv_types)}, got {kv_cache_type!r}")
        self.n_ctx = int(n_ctx)
        self.n_threads = int(n_threads)
        self.n_batch = max(1, min(int(n_batch), self.n_ctx))
        self.repack = bool(repack)
        try:
            with _model_params(llama_cpp, use_extra_bufts=self.repack):
                self._llm = llama_cpp.Llama(
                    model_path=str(model_path), n_ctx=self.n_ctx, n_batch=self.n_batch, n_ubatch=self.n_batch,
                    n_threads=int(n_threads), n_threads_batch=int(n_threads), seed=int(seed),
                    logits_all=False, verbose=verbose, n_gpu_layers=0,
                    type_k=kv_types[kv_cache_type], type_v=kv_types[kv_cache_type])
        except Exception as exc:  # noqa: BLE001 - llama-cpp-python raises ValueError/RuntimeError
            detail = _last_log(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise EdgeqError(f"{model_path}: llama.cpp could not load the model: {detail}") from None
        self._ctx = self._llm.ctx
        self._model = self._llm.model
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        if lora_paths:
            self._attach_loras(lora_paths, scales)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._pos = 0
        self._eos: frozenset[int] | None = None
        self.model_path = model_path
        self.lora_paths = tuple(lora_paths)

    # ---- setup -------------------------------------------------------------------------------
    def _attach_loras(self, paths: list[Path], scales: list[float]) -> None:
        lib = self._lib
        for p in paths:
            _LOG_TAIL.clear()
            ad = lib.llama_adapter_lora_init(self._model, str(p).encode("utf-8"))
            if not ad:
                self.close()
                raise EdgeqError(f"{p}: llama.cpp could not load the LoRA adapter: "
                                 f"{_last_log('wrong base model or not an adapter GGUF?')}")
            self._adapters.append(ad)
        arr = (lib.llama_adapter_lora_p_ctypes * len(self._adapters))(*self._adapters)
        sc = (ctypes.c_float * len(scales))(*scales)
        if lib.llama_set_adapters_lora(self._ctx, arr, len(self._adapters), sc) != 0:
            self.close()
            raise EdgeqError(f"llama.cpp refused the LoRA adapters {[str(p) for p in paths]}")

    # ---- text --------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        """llama.cpp's own ``llama_detokenize`` (control tokens dropped, no BOS-space hack)."""
        ids = [int(i) for i in ids]
        if not ids:
            return ""
        lib = self._lib
        arr = (lib.llama_token * len(ids))(*ids)
        size = max(64, 8 * len(ids))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_detokenize(self._vocab, arr, len(ids), buf, size, False, False)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 1
        raise EdgeqError("llama_detokenize failed")

    @property
    def eos_ids(self) -> frozenset[int]:  # type: ignore[override]
        if self._eos is None:
            lib = self._lib
            self._eos = frozenset(i for i in range(self.n_vocab) if lib.llama_vocab_is_eog(self._vocab, i))
        return self._eos

    def metadata(self) -> dict[str, str]:
        return dict(self._llm.metadata)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._llm.metadata.get("tokenizer.chat_template"))

    def apply_chat_template(self, prompt: str) -> str:
        """Render a single user turn with the GGUF's ``tokenizer.chat_template`` (jinja2,
        sandboxed, generation prompt on); the prompt unchanged when the file has none."""
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return prompt

        def piece(key: str) -> str:
            # the file's own ids: llama.cpp substitutes defaults (e.g. BOS 11 for BPE) when absent
            tok_id = self._llm.metadata.get(key)
            if tok_id is None:
                return ""
            return self._llm._model.token_get_text(int(tok_id))

        return render(template, prompt, bos_token=piece("tokenizer.ggml.bos_token_id"),
                      eos_token=piece("tokenizer.ggml.eos_token_id"))

    # ---- compute -----------------------------------------------------------------------------
    def _clear(self) -> None:
        lib = self._lib
        mem = lib.llama_get_memory(self._ctx)
        if mem:
            lib.llama_memory_clear(mem, True)
        self._pos = 0

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if not ids:
            raise EdgeqError("empty token sequence")
        bad = [i for i in ids if i < 0 or i >= self.n_vocab]
        if bad:
            raise EdgeqError(f"token id {bad[0]} out of range [0, {self.n_vocab})")
        return ids

    def _decode(self, ids: Sequence[int], all_logits: bool, last: int = 1) -> np.ndarray:
        """Append ``ids`` at the current position; return logits (rows = positions asked for: all,
        or the last ``last``)."""
        lib = self._lib
        if self._pos + len(ids) > self.n_ctx:
            raise EdgeqError(f"context of {self._pos + len(ids)} tokens exceeds n_ctx={self.n_ctx}")
        rows: list[np.ndarray] = []
        b = self._batch
        for s in range(0, len(ids), self.n_batch):
            chunk = ids[s:s + self.n_batch]
            n = len(chunk)
            b.n_tokens = n
            for j, t in enumerate(chunk):
                b.token[j] = t
                b.pos[j] = self._pos + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                b.logits[j] = 1 if (all_logits or s + j >= len(ids) - last) else 0
            _LOG_TAIL.clear()
            rc = lib.llama_decode(self._ctx, b)
            if rc != 0:
                raise EdgeqError(f"llama_decode failed with code {rc}: {_last_log('no details')}")
            self._pos += n
            if all_logits:
                ptr = lib.llama_get_logits(self._ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(n * self.n_vocab,)).reshape(n, self.n_vocab).copy())
            else:  # the rows asked for in this chunk, in order
                for j in range(max(0, len(ids) - last - s), n):
                    ptr = lib.llama_get_logits_ith(self._ctx, j)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).reshape(1, self.n_vocab).copy())
        return np.concatenate(rows, axis=0).astype(np.float32, copy=False)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        ids = self._check_ids(token_ids)
        self._clear()
        return self._decode(ids, all_logits=True)

    def last_logits(self, token_ids: Sequence[int], n: int) -> np.ndarray:
        ids = self._check_ids(token_ids)
        check_last(n, len(ids))
        self._clear()
        return self._decode(ids, all_logits=False, last=n)

    def _start(self, prompt_ids: Sequence[int]) -> np.ndarray:
        ids = self._check_ids(prompt_ids)
        self._clear()
        return self._decode(ids, all_logits=False)[-1]

    def _step(self, token_id: int) -> np.ndarray:
        return self._decode(self._check_ids([token_id]), all_logits=False)[-1]

    def close(self) -> None:
        lib = self._lib
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self._llm is not None and self._adapters:
            try:
                lib.llama_set_adapters_lora(self._ctx, None, 0, None)
            except Exception:  # noqa: BLE001
                pass
        for ad in self._adapters:
            lib.llama_adapter_lora_free(ad)
        self._adapters = []
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __del__(self):  # best effort; explicit close() preferred
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
