"""A tiny model pruned with bias compensation, shared by the formats' bias tests."""
import numpy as np

RATES = (0.0, 0.25, 0.5)


def biased_ir(model_dir, dims: str = "all", rates=RATES):
    """``model_dir`` through the build's pruning steps with ``--prune-bias`` (4 x 64 Alpaca tokens)."""
    from edgeq import pipeline
    from edgeq.build import BuildOptions, compress_steps
    from edgeq.frontend import load_model
    from edgeq.targets import load_target

    opts = BuildOptions(model=model_dir, out=model_dir / "unused", prune_rates=rates, calib_samples=4, calib_len=64,
                        prune_bias=True, prune_dims=dims)
    target = load_target("cpu-avx2")
    ctx = pipeline.run(compress_steps(opts, target), pipeline.BuildContext(opts=opts, target=target,
                                                                           log=lambda m: None, ir=load_model(model_dir)))
    return ctx.ir


def ids_for(ir, n=24, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(0, ir.hparams.vocab_size, n)]
