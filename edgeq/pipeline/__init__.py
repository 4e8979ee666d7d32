"""The build pipeline as data: a build is a list of frozen, versioned step configs
(:mod:`edgeq.pipeline.steps`) run by one runner (:mod:`edgeq.pipeline.runner`) that times and
logs each step and records it in the manifest's ``steps`` list. ``edgeq.build.steps`` makes the
list from the options a user typed."""
from edgeq.pipeline.runner import BuildContext, Step, registered, run
from edgeq.pipeline.steps import (
    AdaptersStep,
    CalibrateStep,
    ChatTemplateStep,
    CheckMemoryStep,
    GoldensStep,
    LoadStep,
    LowerStep,
    PlanStep,
    PruneBiasStep,
    QuantizeStep,
    RatePlanStep,
    RecoverStep,
    SortStep,
)

__all__ = ["AdaptersStep", "BuildContext", "CalibrateStep", "ChatTemplateStep", "CheckMemoryStep", "GoldensStep", "LoadStep", "LowerStep",
           "PlanStep", "PruneBiasStep", "QuantizeStep", "RatePlanStep", "RecoverStep", "SortStep", "Step", "registered", "run"]
