"""How well the planner predicts the KL of llama.cpp's activation rounding (edgeq/quant/act_noise.py).

For each named linear: the planner's prediction ``gain x Σ_j ‖w_j‖² E[δ_j²]`` (gain = the KL probe's
KL per unit of layer output error, measured as the planner does with a Q4_0 round-to-nearest
perturbation of the weight; E[δ²] from calibration) against the KL measured directly: the probe's
torch forward with only that linear's input rounded by the codec (q8_0: legacy types' dot type;
q8_k: the K-quants'), on the same probe sequences.

    PYTHONPATH=. EDGEQ_DATA=../shared/data .venv/bin/python tools/bench_act_kl.py \\
        --model models/cache/gemma3-270m --probe-samples 2 blk.0.ffn_down blk.5.attn_output ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeq.calibrate import alpaca_token_sequences, calibrate  # noqa: E402
from edgeq.frontend import load_model  # noqa: E402
from edgeq.quant import act_noise  # noqa: E402
from edgeq.quant.codecs import codec_for  # noqa: E402
from edgeq.quant.formats import as_qtype  # noqa: E402
from edgeq.quant.gptq import output_error, rtn  # noqa: E402
from edgeq.quant.sensitivity import KLProbe  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--probe-samples", type=int, default=2)
    ap.add_argument("linears", nargs="+")
    args = ap.parse_args(argv)
    import torch

    ir = load_model(args.model)
    seqs = alpaca_token_sequences(ir.tokenizer, n_samples=args.calib_samples, seq_len=256)
    stats = calibrate(ir, seqs, progress=False)
    probe = KLProbe(ir, [s[:128] for s in seqs[-args.probe_samples:]])
    m = probe.model
    plain = m._linear

    def rounded_kl(layer, role, codec) -> float:
        def patched(x, li, r, use_lora, rows=None, cols=None):
            if li == layer and r == role:
                shape = x.shape
                x = torch.from_numpy(act_noise.rounded(x.detach().numpy().reshape(-1, shape[-1]), codec).reshape(shape))
            return plain(x, li, r, use_lora, rows, cols)

        m._linear = patched
        try:
            with torch.no_grad():
                h = m.hidden(probe.ids, use_lora=False, start=layer, x=probe.inputs[layer])
                return probe._kl(h @ m.out_w.T)
        finally:
            m._linear = plain

    print("| linear | codec | predicted KL | measured KL | predicted / measured |")
    print("|---|---|---|---|---|")
    for name in args.linears:
        lin = ir.linears[name]
        w = np.asarray(lin.weight, np.float32)
        layer = stats.layers[lin.layer]
        cov = layer.input_cov(lin.role)
        q = rtn(w, codec_for(as_qtype("Q4_0")), np.diag(cov)).dequant
        gain = probe.linear_kl(lin.layer, lin.role, q) / output_error(w - q, cov)
        for codec in ("q8_0", "q8_k"):
            noise = layer.input_noise(lin.role, codec)
            if noise is None:
                continue
            pred = gain * act_noise.activation_error(w, noise)
            got = rounded_kl(lin.layer, lin.role, codec)
            print(f"| {name} | {codec} | {pred:.3e} | {got:.3e} | {pred / max(got, 1e-30):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
