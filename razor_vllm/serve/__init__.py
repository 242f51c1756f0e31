"""Serving-side extras loaded by vLLM's API server (``vllm.endpoint_plugins``)."""
