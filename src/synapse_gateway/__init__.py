"""Synapse: a self-hosted, OpenAI-compatible LLM inference gateway."""

__version__ = "0.1.0"
