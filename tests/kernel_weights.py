"""Random packed weights (and a low-rank branch where the spec has a rank) for the kernel tests."""
from __future__ import annotations

import numpy as np

from edgeq.kernels import layout
from edgeq.quant.intgroup import rtn_int


def random_weights(spec, n: int, k: int, seed: int = 0):
    """(packed arrays, the round-to-nearest tensor, the generator, for more draws from the same stream)."""
    rng = np.random.default_rng(seed)
    t = rtn_int(rng.standard_normal((n, k)).astype(np.float32),
                f"int{spec.bits}_g{spec.group}_{'sym' if spec.symmetric else 'asym'}")
    arrays = layout.pack_weight(t.codes, t.scales, t.zero_points, spec)
    if spec.rank:
        arrays.update(layout.pack_low_rank(rng.standard_normal((spec.rank, k)).astype(np.float32) * 0.1,
                                           rng.standard_normal((n, spec.rank)).astype(np.float32) * 0.1, spec))
    return arrays, t, rng
