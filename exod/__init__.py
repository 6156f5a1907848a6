"""exod: one machine for a large LLM, made of several."""

__version__ = "0.1.0"
