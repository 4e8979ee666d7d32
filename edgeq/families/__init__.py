"""Model families: one table of architecture facts per family (see :mod:`edgeq.families.base`)."""
from edgeq.families.base import LINEAR_ROLES, Family, NormKind, RopeStyle
from edgeq.families.registry import FAMILIES, by_gguf_arch, by_hf_model_type, family, hf_model_types

__all__ = ["FAMILIES", "LINEAR_ROLES", "Family", "NormKind", "RopeStyle", "by_gguf_arch", "by_hf_model_type",
           "family", "hf_model_types"]
