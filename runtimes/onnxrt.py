"""onnxruntime runtime for edgeq ONNX artifacts (numpy + onnxruntime + tokenizers; no torch).

The artifact's graph (edgeq.backends.onnx.lower) takes new tokens + the KV cache and returns logits + the
grown cache; this session keeps the cache as numpy arrays between calls. LoRA adapters kept
separate ship as onnxruntime adapter files and are activated per run (``set_adapter``), so an
adapter is switched or disabled without rebuilding or reloading the base model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.artifact import artifact_path, read_tokenizer_spec
from edgeq.errors import EdgeqError
from edgeq.ir import HParams
from runtimes.base import RateSwitchMixin, Session, artifact_manifest, check_tokens
from runtimes.text import SpecTextMixin


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise EdgeqError("the onnx runtime needs onnxruntime: pip install 'edgeq[onnx]'") from None
    return ort


class OnnxSession(RateSwitchMixin, SpecTextMixin, Session):
    name = "onnxruntime"

    def __init__(self, artifact_dir: str | Path, manifest: dict | None = None, n_ctx: int = 2048,
                 threads: int | None = None, prune: float = 0.0, prepack: bool = True):
        """``prepack=False``: onnxruntime keeps no prepacked private copy of the MatMulNBits
        weights (they stay in the memory-mapped data file and are unpacked per call: less memory,
        slower, slightly different rounding (float32 instead of int8 products at accuracy level 4))."""
        ort = _ort()
        self.root = root = Path(artifact_dir)
        m = artifact_manifest(root, manifest, "onnx")
        self.manifest = m
        info = m["onnx"]
        self._rates = tuple(float(r) for r in info.get("rates") or (0.0,))
        self._rate_index = self._index_of(prune)
        self.prune_rate = self._rates[self._rate_index]
        self.hp = hp = HParams.from_json(m["hparams"])
        self.n_ctx = n_ctx
        so = ort.SessionOptions()
        self.n_threads = int(threads or 0)
        so.intra_op_num_threads = self.n_threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if not prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        model_path = artifact_path(root, info["model_file"])
        if info.get("data_file"):
            artifact_path(root, info["data_file"])
        try:
            self.sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise EdgeqError(f"{root / info['model_file']}: onnxruntime cannot load it ({msg[:200]})") from None
        self._spec = None
        self._tok_file = info.get("tokenizer_file")
        self._vocab_file = info.get("tokenizer_vocab_file")
        self._adapters = {}
        for name, fname in sorted(info.get("adapter_files", {}).items()):
            a = ort.LoraAdapter()
            apath = artifact_path(root, fname)
            try:
                a.Load(str(apath))
            except Exception:
                raise EdgeqError(f"{root / fname}: corrupt or unreadable onnxruntime adapter file") from None
            self._adapters[name] = a
        self.active_adapters: tuple[str, ...] = tuple(self._adapters)  # as built: every adapter on
        self._run_options = None
        self._set_run_options()
        KV, D = hp.num_kv_heads, hp.head_dim
        self._empty = np.zeros((1, KV, 0, D), np.float32)
        self._out_names = ["logits"] + [f"present.{i}.{kv}" for i in range(hp.num_layers) for kv in ("key", "value")]
        self._past: list[np.ndarray] = []
        self._ids: list[int] = []
        self._rate_input = info.get("rate_input")
        if self._rate_input and self._rate_input not in {i.name for i in self.sess.get_inputs()}:
            raise EdgeqError(f"{root / info['model_file']}: the graph has no {self._rate_input!r} input the manifest names")
        self.reset()

    @property
    def version(self) -> str:
        return _ort().__version__

    def resident_weight_bytes(self, rate: float | None = None) -> int:
        """Bytes of weights a run at ``rate`` (default: the current one) reads: the graph + its
        weight file, less the MLP segments the rate skips (adapters excluded)."""
        info = self.manifest["onnx"]
        per_rate = info.get("weight_bytes_per_rate")
        if per_rate:
            return int(per_rate[f"{self._rates[self._index_of(self.prune_rate if rate is None else rate)]:g}"])
        return sum(artifact_path(self.root, info[k]).stat().st_size for k in ("model_file", "data_file"))

    # ---- adapters ------------------------------------------------------------------------------
    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def set_adapter(self, names: str | Sequence[str] | None) -> None:
        """Activate the named adapters (``None`` / ``[]``: the base model). Takes effect on the next
        call; the KV cache is kept (call ``reset`` or start a new prompt for a clean switch)."""
        if names is None:
            names = ()
        elif isinstance(names, str):
            names = (names,)
        for n in names:
            if n not in self._adapters:
                raise EdgeqError(f"adapter {n!r} is not in this artifact (available: "
                                 f"{', '.join(self._adapters) or 'none'})")
        self.active_adapters = tuple(names)
        self._set_run_options()

    def _set_run_options(self) -> None:
        ort = _ort()
        ro = ort.RunOptions()
        for n in self.active_adapters:
            ro.add_active_adapter(self._adapters[n])
        self._run_options = ro

    # ---- text (SpecTextMixin) ---------------------------------------------------------------
    def _tokenizer_spec(self):
        if self._spec is None and self._tok_file:
            self._spec = read_tokenizer_spec(artifact_path(self.root, self._tok_file))
        return self._spec

    def _packed_tokenizer(self):
        return artifact_path(self.root, self._vocab_file) if self._vocab_file else None

    # ---- pruning rates (RateSwitchMixin) ----------------------------------------------------------
    def _apply_rate(self, index: int) -> None:
        self._rate_index = index  # fed to the graph's rate input

    def _forward_cached(self, ids) -> None:
        self._run(ids, all_logits=False)

    # ---- compute -------------------------------------------------------------------------------
    def reset(self) -> None:
        self._past = [self._empty] * (2 * self.hp.num_layers)
        self._pos = 0
        self._ids = []

    def _run(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        hp = self.hp
        arr = check_tokens(ids, hp.vocab_size, self._pos, self.n_ctx).reshape(1, -1)
        feeds = {"input_ids": arr, "logits_from": np.array(0 if all_logits else arr.size - 1, np.int64)}
        if self._rate_input:
            feeds[self._rate_input] = np.array(self._rate_index, np.int64)
        for i in range(hp.num_layers):
            feeds[f"past.{i}.key"] = self._past[2 * i]
            feeds[f"past.{i}.value"] = self._past[2 * i + 1]
        outs = self.sess.run(self._out_names, feeds, self._run_options)
        self._past = list(outs[1:])
        self._pos += arr.size
        self._ids.extend(int(t) for t in arr[0])
        return outs[0][0]

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        self.reset()
        return self._run(token_ids, all_logits=True).astype(np.float32, copy=False)

    def _start(self, prompt_ids: Sequence[int]) -> np.ndarray:
        self.reset()
        return self._run(prompt_ids, all_logits=False)[-1]

    def _step(self, token_id: int) -> np.ndarray:
        return self._run([token_id], all_logits=False)[-1]
