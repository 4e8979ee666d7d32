"""TVM runtime for edgeq TVM artifacts: the generated kernel library + numpy (no torch).

The four matmuls of every layer (Q|K|V, O, gate|up, down) and the head run as generated kernels
(dequantization, GEMV/GEMM and the fused low-rank branch in one pass; with the manifest's
``act = "int8"`` the kernels quantize activations per group and use integer dot products). A
decode token of an artifact whose manifest lists ``tvm.decoder`` runs entirely in the library
(runtimes/tvm_decoder.py: embedding, norms, attention, SwiGLU / GeGLU and residual adds compiled
too, Gemma 3's blocks included; no numpy; ``EDGEQ_TVM_DECODER=numpy`` runs the numpy decoder
instead). Otherwise (artifacts without ``tvm.decoder``), and for prefill:
RMSNorm, RoPE with the layer's gathered pair frequencies, attention over the KV cache and SwiGLU
are numpy, and so are the family blocks the hparams name (Gemma 3: GeGLU, QK-norm, sandwich norms, scaled embedding,
query scale, sliding-window layers — attending to the window's keys only — with their RoPE base). A pruning
rate is the active width the kernels are called with (a prefix of the MLP channels) plus per-rate
masks of the Q/K pairs and V/O components, so ``set_prune_rate`` switches without touching weights.

The library is code: it is loaded only when its sha256 matches the artifact's manifest.
"""
from __future__ import annotations

import importlib.abc
import os
import platform
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeq.artifact import artifact_path, read_tokenizer_spec
from edgeq.errors import EdgeqError
from edgeq.hashing import sha256_file
from edgeq.ir import HParams
from runtimes.base import RateSwitchMixin, Session, artifact_manifest, check_tokens
from runtimes.reference import ACTIVATIONS, rope_inv_freq
from runtimes.text import SpecTextMixin
from runtimes.tvm_decoder import CompiledDecoder, aligned


# Alignment TVM's DLPack import requires (tvm.runtime.from_dlpack: require_alignment=64, as the
# generated kernels assume aligned buffers); the tvm writer aligns every kernel array to it.
WEIGHT_ALIGN = 64


def runtime_only() -> None:
    """Make a later ``import tvm`` load only TVM's runtime library (3 MB) instead of the compiler
    (~250 MB with LLVM) — for processes that run artifacts and never compile (``edgeq run`` ...).
    ``EDGEQ_TVM_COMPILER=1`` keeps the compiler (processes that also build kernels: the tests)."""
    if "tvm" not in sys.modules and os.environ.get("EDGEQ_TVM_COMPILER") != "1":
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")


class _NoTorch(importlib.abc.MetaPathFinder):
    """Answers "no such module" for torch while TVM loads. ``tvm_ffi`` imports torch when it is
    installed (``tvm_ffi/__init__.py``, ``_convert.py``, ``stream.py``, its Cython ``core``: every
    one a ``try: import torch / except ImportError``), only to accept torch tensors and dtypes: ~210
    MB of a device process's RSS for nothing — the runtime hands it numpy arrays through DLPack,
    which needs no torch. A finder and not ``sys.modules["torch"] = None``: it is removed again
    once TVM has loaded, so a later ``import torch`` in the same process (a test) still works."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (not loaded with the TVM runtime)", name=name)
        return None


_BLAS = None  # threadpoolctl's controller of the BLAS libraries loaded (found once, ~ms)


# prefill attention in blocks of this many queries: each block scores only the keys it can see
# (causal: up to its last query; sliding layers: from its first query's window on), which about
# halves the scores, exps and products of a long causal prompt. Measured on SmolLM2 (int8 kernels,
# 2 threads): 512-token prefill 338 tok/s in one block, 445 in blocks of 128, 466 in blocks of 64;
# 128 tokens 554 / 568 / 594 (docs/benchmarks.md)
QUERY_BLOCK = 64


def _one_blas_thread():
    """A context holding numpy's BLAS to one thread (~10 µs to enter)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def _tvm(threads: int | None):
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)  # read when the thread pool starts
    block = "tvm_ffi" not in sys.modules and "torch" not in sys.modules
    finder = _NoTorch()
    if block:
        sys.meta_path.insert(0, finder)
    try:
        import tvm
    except ImportError:
        raise EdgeqError("the tvm runtime needs TVM: pip install 'edgeq[tvm]' (apache-tvm 0.27)") from None
    finally:
        if block:
            sys.meta_path.remove(finder)
    return tvm


def check_library(root: Path, manifest: dict) -> Path:
    """The artifact's kernel library, after checking its sha256 against the manifest."""
    info = manifest["tvm"]
    lib = artifact_path(root, info["library"])
    want = info.get("library_sha256")
    if not lib.is_file():
        raise EdgeqError(f"{lib}: missing kernel library")
    if want is None or sha256_file(lib) != want:
        raise EdgeqError(f"{lib}: sha256 does not match the manifest; refusing to load a modified library")
    return lib


class TvmSession(RateSwitchMixin, SpecTextMixin, Session):
    name = "tvm"

    def __init__(self, artifact_dir: str | Path, manifest: dict | None = None, n_ctx: int = 2048,
                 threads: int | None = None, prune: float = 0.0):
        self.root = root = Path(artifact_dir)
        m = artifact_manifest(root, manifest, "tvm")
        self.manifest = m
        info = m["tvm"]
        target = info["target"]
        if target.get("kind") == "cuda":
            raise EdgeqError(f"{root}: built for CUDA ({target.get('arch')}); it runs on that GPU, not on this CPU")
        triple = str(target.get("mtriple", ""))
        host = platform.machine()
        if triple and not triple.startswith(host if host != "AMD64" else "x86_64"):
            raise EdgeqError(f"{root}: built for {triple}; run it on that device (this host is {host})")
        lib_path = check_library(root, m)
        self.n_threads = int(threads or 0)
        tvm = _tvm(self.n_threads)
        self._tvm = tvm
        try:
            self.lib = tvm.runtime.load_module(str(lib_path))
        except Exception as exc:  # TVM raises its own error types
            raise EdgeqError(f"{lib_path}: TVM cannot load it ({str(exc).strip().splitlines()[0][:200]})") from None
        self.hp = hp = HParams.from_json(m["hparams"])
        self.n_ctx = n_ctx
        self.block = int(info["block"])
        # the embedding table is the head kernel's: its layout follows the head's activations
        self._dot_layout = info.get("head_act", info.get("act", "float32")) == "int8"
        self._load_weights(artifact_path(root, info["weights_file"]), info)
        self._spec = None
        self._tok_file = info.get("tokenizer_file")
        self._vocab_file = info.get("tokenizer_vocab_file")
        p = m.get("prune")
        self._rates = tuple(float(r) for r in p["rates"]) if p else (0.0,)
        self._widths = {float(r): v for r, v in (p["widths"].items() if p else ())}
        self._masks = self._rate_masks() if len(self._rates) > 1 else None
        self.inv_freq = rope_inv_freq(hp.head_dim, hp.rope_theta)
        # KV cache per layer and KV head, positions contiguous: (layers, KV, n_ctx, head_dim); K after
        # RoPE in the [half 0 | half 1] order of the (sorted) pair slots
        # (64-byte aligned: the compiled decoder hands them to the library in place)
        self._k = aligned((hp.num_layers, hp.num_kv_heads, n_ctx, hp.head_dim))
        self._v = aligned((hp.num_layers, hp.num_kv_heads, n_ctx, hp.head_dim))
        self._consts = None
        names = info.get("decoder")
        self._decoder = (CompiledDecoder(self, names) if names and os.environ.get("EDGEQ_TVM_DECODER") != "numpy"
                         else None)
        self._ids: list[int] = []
        self._pos = 0
        self.set_prune_rate(prune)  # sets prune_rate and the kernels' active MLP widths (_ffn)

    @property
    def version(self) -> str:
        return self._tvm.__version__

    # ---- weights ---------------------------------------------------------------------------------
    def _load_weights(self, path: Path, info: dict) -> None:
        # lazy, and the one import of edgeq.frontend in runtimes/: the safetensors reader is core
        # (docs/architecture.md, "Layers"); it moves out of frontend/ with the front-end rework
        from edgeq.frontend.safetensors_io import map_safetensors

        # memory-mapped, copy-on-write (DLPack exports only writable arrays; nothing writes them):
        # the weights stay file-backed page cache, not private memory
        w = map_safetensors(path, copy_on_write=True)
        tvm = self._tvm
        self.mapped_weights = self.copied_weights = 0  # bytes handed to the kernels in place / copied

        def device(a: np.ndarray):
            if a.ctypes.data % WEIGHT_ALIGN == 0:  # TVM's from_dlpack requires 64-byte aligned data
                try:
                    t = tvm.runtime.from_dlpack(a)
                    self.mapped_weights += a.nbytes
                    return t
                except Exception:  # e.g. a TVM built without DLPack import: a private copy below
                    pass
            # an artifact written before its tensors were aligned (or an odd-sized array before
            # this one): a private aligned copy, as the kernels assume aligned buffers
            self.copied_weights += a.nbytes
            raw = np.empty(a.nbytes + WEIGHT_ALIGN, np.uint8)
            pad = (-raw.ctypes.data) % WEIGHT_ALIGN
            c = raw[pad:pad + a.nbytes].view(a.dtype).reshape(a.shape)
            c[...] = a
            try:
                return tvm.runtime.from_dlpack(c)
            except Exception:
                return tvm.runtime.tensor(c, tvm.cpu())

        kernel_arrays = (".qw", ".sc", ".zp", ".a", ".b")
        self._np = {k: v for k, v in w.items() if not k.endswith(kernel_arrays)}
        self._np.update({k: w[k][...] for k in ("token_embd.qw", "token_embd.sc")})  # the embedding lookup
        for v in self._np.values():
            v.flags.writeable = False  # views of the (copy-on-write) map: never written
        self._dev = {k: device(v) for k, v in w.items() if k.endswith(kernel_arrays)}
        self._bytes = {k: v.nbytes for k, v in w.items()}
        self._kernels = {}
        for name, kname in info["kernels"].items():
            try:
                fns = (self.lib[f"{kname}_decode"], self.lib[f"{kname}_prefill"])
            except Exception:
                raise EdgeqError(f"{path.parent / info['library']}: no kernel {kname} for {name}") from None
            args = [self._dev[f"{name}.{a}"] for a in ("qw", "sc", "zp", "a", "b") if f"{name}.{a}" in self._dev]
            self._kernels[name] = (fns, args)

    def _matmul(self, name: str, x: np.ndarray, n: int) -> np.ndarray:
        (decode, prefill), args = self._kernels[name]
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty((x.shape[0], n), np.float32)
        (decode if x.shape[0] == 1 else prefill)(x, *args, y)
        return y

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the int8 table, read from the head kernel's blocked layout (row n = lane n % block
        of block n // block)."""
        qw, sc = self._np["token_embd.qw"], self._np["token_embd.sc"]
        b, lane = ids // self.block, ids % self.block
        if self._dot_layout:  # int8-activation kernels: (NB, K / 4, 4 * block), lane j = bytes 4j..4j+3
            q = qw[b[:, None, None], np.arange(qw.shape[1])[None, :, None], (4 * lane)[:, None, None] + np.arange(4)]
            q = q.reshape(len(ids), -1).astype(np.float32) - 128.0
        else:
            q = qw[b, :, lane].astype(np.float32) - 128.0  # (T, K)
        s = sc[b, :, lane]  # (T, K / group)
        return (q.reshape(len(ids), s.shape[1], -1) * s[..., None]).reshape(len(ids), -1)

    def resident_weight_bytes(self, rate: float | None = None) -> int:
        """Bytes of weights a token at ``rate`` reads (the MLP's active prefix)."""
        rate = self.prune_rate if rate is None else rate
        f = self._ffn_widths(rate)
        F = self.hp.intermediate_size
        total = 0
        for k, b in self._bytes.items():
            parts = k.split(".")  # blk.{i}.{matmul}.{array}
            pruned = len(parts) == 4 and parts[0] == "blk" and (
                (parts[2] == "gate_up" and parts[3] != "a") or (parts[2] == "down" and parts[3] in ("qw", "sc", "a")))
            total += b * f[int(parts[1])] // F if pruned else b
        return int(total)

    # ---- pruning rates (RateSwitchMixin) ----------------------------------------------------------
    def _apply_rate(self, index: int) -> None:
        self._ffn = self._ffn_widths(self._rates[index])  # the kernels' active MLP width per layer
        self._rate_row = index  # the row of the per-rate bias compensation tables

    def _forward_cached(self, ids) -> None:
        self._forward(ids)

    def _ffn_widths(self, rate: float) -> list[int]:
        r = self._rates[self._index_of(rate)]
        if not self._widths:
            return [self.hp.intermediate_size] * self.hp.num_layers
        return [int(w["ffn"]) for w in self._widths[r]]

    def _rate_masks(self):
        """rate -> per layer (q, k, v, o) 0/1 float masks (None where a rate keeps everything)."""
        hp = self.hp
        H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
        half = D // 2
        out = {}
        for r in self._rates:
            layers = []
            for w in self._widths[r]:
                pair = np.tile(np.arange(half) < int(w["qk_pairs"]), 2)
                comp = np.arange(D) < int(w["v_dims"])
                ms = (np.tile(pair, H), np.tile(pair, KV), np.tile(comp, KV), np.tile(comp, H))
                layers.append(tuple(None if m.all() else m.astype(np.float32) for m in ms))
            out[r] = layers
        return out

    # ---- text --------------------------------------------------------------------------------------
    def _tokenizer_spec(self):
        if self._spec is None and self._tok_file:
            self._spec = read_tokenizer_spec(artifact_path(self.root, self._tok_file))
        return self._spec

    def _packed_tokenizer(self):
        return artifact_path(self.root, self._vocab_file) if self._vocab_file else None

    # ---- compute -----------------------------------------------------------------------------------
    def reset(self) -> None:
        self._pos = 0
        self._ids = []

    def _layer_consts(self):
        """Per layer: (attn_norm, ffn_norm, qkv bias, o bias, gate_up bias, down bias, o / down per-rate
        bias compensation tables (rates, hidden), q / k norms, post-attention / post-MLP norms (None
        where the family has none), rope group), and the distinct RoPE frequency tables (layers with
        the same pair order and RoPE base share one)."""
        hp, W = self.hp, self._np
        groups: dict[bytes, int] = {}
        freqs = []
        layers = []
        for li in range(hp.num_layers):
            theta = hp.layer_rope_theta(li)
            inv = self.inv_freq if theta == hp.rope_theta else rope_inv_freq(hp.head_dim, theta)
            f = inv[W[f"blk.{li}.rope_index"]]  # (KV, half): each pair slot's frequency
            key = f.tobytes()
            if key not in groups:
                groups[key] = len(freqs)
                freqs.append(f)
            layers.append(tuple(W.get(f"blk.{li}.{n}") for n in ("attn_norm", "ffn_norm", "qkv.bias", "o.bias",
                                                                  "gate_up.bias", "down.bias", "o.rate_bias",
                                                                  "down.rate_bias", "attn_q_norm", "attn_k_norm",
                                                                  "post_attention_norm", "post_ffw_norm"))
                          + (groups[key],))
        return layers, freqs

    @staticmethod
    def _norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        ms = np.einsum("ij,ij->i", x, x) / np.float32(x.shape[1])
        return x * (1.0 / np.sqrt(ms + np.float32(eps)))[:, None] * w

    @staticmethod
    def _head_norm(x: np.ndarray, w: np.ndarray, n: int, eps: float) -> np.ndarray:
        """QK-norm: RMSNorm of each of the ``n`` heads of ``x`` (T, n * head_dim) over head_dim."""
        h = x.reshape(x.shape[0], n, -1)
        ms = np.einsum("tnd,tnd->tn", h, h) / np.float32(h.shape[2])
        return (h * (1.0 / np.sqrt(ms + np.float32(eps)))[:, :, None] * w).reshape(x.shape)

    def _forward(self, ids: Sequence[int]) -> np.ndarray:
        """The numpy path (prefill, and decode without a compiled decoder) with numpy's BLAS held
        to one thread: the kernels' parallelism is TVM's thread pool, and OpenBLAS threads spinning
        beside it between kernel calls halved the prefill at 2 threads (212 vs 452 tok/s on
        SmolLM2, docs/benchmarks.md); one BLAS thread also gives the bits the build's goldens were
        recorded with (edgeq.blas)."""
        with _one_blas_thread():
            return self._forward_numpy(ids)

    def _forward_numpy(self, ids: Sequence[int]) -> np.ndarray:
        hp = self.hp
        ids = check_tokens(ids, hp.vocab_size, self._pos, self.n_ctx)
        start, T = self._pos, ids.size
        end = start + T
        if self._consts is None:
            self._consts = self._layer_consts()
        layers, freqs = self._consts
        H, KV, D = hp.num_heads, hp.num_kv_heads, hp.head_dim
        grp, half, eps, V = H // KV, D // 2, hp.rms_norm_eps, self.block
        masks = self._masks[self.prune_rate] if self._masks is not None else None
        x = self._embed(ids)
        if hp.embedding_scale != 1.0:
            x = x * np.float32(hp.embedding_scale)
        pos = np.arange(start, end, dtype=np.float32)
        rot = []
        for f in freqs:  # cos/sin (T, KV, 1, half) per distinct pair order
            ang = pos[:, None, None, None] * f[None, :, None, :]
            rot.append((np.cos(ang), np.sin(ang)))
        causal = None if T == 1 else np.triu(np.full((T, end), -np.inf, np.float32), k=start + 1)
        # sliding layers attend to keys lo_w.. only (none older is within any query's window); the
        # window's mask over them (a single new token sees them all: none)
        win = hp.sliding_window or 0
        lo_w = max(0, start - win + 1) if win else 0
        local = None
        if win and T > 1:
            qp, kp = np.arange(start, end)[:, None], np.arange(lo_w, end)[None, :]
            local = np.where((kp > qp) | (qp - kp >= win), -np.inf, 0).astype(np.float32)
        scale = np.float32(hp.attention_scale)
        act_fn = ACTIVATIONS[hp.hidden_act]
        kc, vc = self._k, self._v
        row = self._rate_row
        for li, (n1, n2, b_qkv, b_o, b_gu, b_d, rb_o, rb_d, qn, kn, pn_a, pn_f, rg) in enumerate(layers):
            h = self._norm(x, n1, eps)
            qkv = self._matmul(f"blk.{li}.qkv", h, (H + 2 * KV) * D)
            if b_qkv is not None:
                qkv += b_qkv
            if masks is not None:
                mq, mk, mv, mo = masks[li]
                if mq is not None:
                    qkv[:, :H * D] *= mq
                if mk is not None:
                    qkv[:, H * D:(H + KV) * D] *= mk
                if mv is not None:
                    qkv[:, (H + KV) * D:] *= mv
            if qn is not None:  # QK-norm, before RoPE
                qkv[:, :H * D] = self._head_norm(qkv[:, :H * D], qn, H, eps)
                qkv[:, H * D:(H + KV) * D] = self._head_norm(qkv[:, H * D:(H + KV) * D], kn, KV, eps)
            cos, sin = rot[rg]
            k = qkv[:, H * D:(H + KV) * D].reshape(T, KV, 2, half)
            kr = np.concatenate([k[:, :, :1] * cos - k[:, :, 1:] * sin, k[:, :, 1:] * cos + k[:, :, :1] * sin], axis=2)
            kc[li, :, start:end] = kr.reshape(T, KV, D).transpose(1, 0, 2)
            vc[li, :, start:end] = qkv[:, (H + KV) * D:].reshape(T, KV, D).transpose(1, 0, 2)
            q = qkv[:, :H * D].reshape(T, KV, grp, 2, half)
            c, sn = cos[:, :, None], sin[:, :, None]
            q = np.concatenate([q[:, :, :, :1] * c - q[:, :, :, 1:] * sn, q[:, :, :, 1:] * c + q[:, :, :, :1] * sn],
                               axis=3)
            q = q.reshape(T, KV, grp, D).transpose(1, 2, 0, 3)  # (KV, grp, T, D)
            sliding = hp.is_sliding(li)
            o = np.empty((KV, grp, T, D), np.float32)
            for a in range(0, T, QUERY_BLOCK):  # query blocks: only the keys a block can see
                b = min(T, a + QUERY_BLOCK)
                k1 = start + b  # keys up to the block's last query
                k0 = max(lo_w, start + a - win + 1) if sliding else 0
                n_q, n_k = b - a, k1 - k0
                qb = q[:, :, a:b].reshape(KV, grp * n_q, D)  # rows (head, position)
                att = np.matmul(qb, kc[li, :, k0:k1].transpose(0, 2, 1)) * scale  # (KV, grp*n_q, n_k)
                mask = (local[a:b, k0 - lo_w:k1 - lo_w] if sliding else causal[a:b, k0:k1]) if T > 1 else None
                if mask is not None:
                    att = (att.reshape(KV, grp, n_q, n_k) + mask).reshape(KV, grp * n_q, n_k)
                att = np.exp(att - att.max(axis=-1, keepdims=True))
                att /= att.sum(axis=-1, keepdims=True)
                o[:, :, a:b] = np.matmul(att, vc[li, :, k0:k1]).reshape(KV, grp, n_q, D)
            o = o.transpose(2, 0, 1, 3).reshape(T, H * D)
            if masks is not None and mo is not None:
                o = o * mo
            y = self._matmul(f"blk.{li}.o", o, hp.hidden_size)
            if b_o is not None:
                y += b_o
            if rb_o is not None:  # bias compensation of the O inputs this rate prunes
                y += rb_o[row]
            if pn_a is not None:
                y = self._norm(y, pn_a, eps)
            x = x + y
            h = self._norm(x, n2, eps)
            f = self._ffn[li]
            gu = self._matmul(f"blk.{li}.gate_up", h, 2 * f)
            if b_gu is not None:
                gu += b_gu[:2 * f]
            gu = gu.reshape(T, f // V, 2, V)
            g = gu[:, :, 0]
            act = (act_fn(g) * gu[:, :, 1]).reshape(T, f)
            y = self._matmul(f"blk.{li}.down", act, hp.hidden_size)
            if b_d is not None:
                y += b_d
            if rb_d is not None:  # bias compensation of the MLP channels this rate prunes
                y += rb_d[row]
            if pn_f is not None:
                y = self._norm(y, pn_f, eps)
            x = x + y
        self._pos = end
        self._ids.extend(int(t) for t in ids)
        return self._norm(x, self._np["output_norm"], eps)

    def _head(self, x: np.ndarray) -> np.ndarray:
        name = "token_embd" if self.hp.tie_word_embeddings else "output"
        return self._matmul(name, x, self.hp.vocab_size)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        self.reset()
        return self._head(self._forward(token_ids))

    def _start(self, prompt_ids: Sequence[int]) -> np.ndarray:
        self.reset()
        return self._head(self._forward(prompt_ids)[-1:])[0]

    @property
    def compiled_decoder(self) -> bool:
        """Whether a decode token runs in the library (the manifest's ``tvm.decoder``)."""
        return self._decoder is not None

    def _step(self, token_id: int) -> np.ndarray:
        if self._decoder is None:
            return self._head(self._forward([token_id]))[0]
        t = int(token_id)
        if not 0 <= t < self.hp.vocab_size:
            raise EdgeqError(f"token id out of range [0, {self.hp.vocab_size})")
        if self._pos + 1 > self.n_ctx:
            raise EdgeqError(f"context of {self._pos + 1} tokens exceeds n_ctx={self.n_ctx}")
        logits = self._decoder.step(t, self._pos, self._rate_row)
        self._pos += 1
        self._ids.append(t)
        return logits
