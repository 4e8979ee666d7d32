"""edgeq: an on-device edge deployment compiler for fine-tuned LLMs."""

__version__ = "0.1.0"
