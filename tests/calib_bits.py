"""The bits of calibration statistics (tests of edgeq.calibrate's shards, in-process and as
executor tasks): every statistic's bytes, the angular distance's float and the token count, per
layer. (Importable as ``calib_bits``: tests/conftest.py puts this directory on sys.path.)"""
from __future__ import annotations

import numpy as np

FIELDS = ("mlp_zz", "attn_xx", "q_diag", "k_diag", "o_xx", "ffn_xx", "z_mean", "o_mean")


def stats_bits(stats) -> list[tuple]:
    return [(tuple(np.asarray(getattr(L, name)).tobytes() for name in FIELDS), float(L.angular).hex(), L.n_tokens)
            for L in stats.layers]
