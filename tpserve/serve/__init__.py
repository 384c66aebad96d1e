"""Serving: the engine (continuous batching), the OpenAI-compatible HTTP API, metrics, sampling
and text."""
