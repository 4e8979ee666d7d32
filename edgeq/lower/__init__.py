"""Lowerings: ModelIR -> artifact payloads (one module per artifact kind)."""
