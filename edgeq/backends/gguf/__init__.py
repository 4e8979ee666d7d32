"""The gguf backend (see backend.py; registered in edgeq/backends/__init__.py)."""
