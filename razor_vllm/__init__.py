"""razor-vllm: RazorAttention KV-cache compression as a vLLM attention backend."""

__version__ = "0.1.0"
