# razor-vllm on GPU nodes: vLLM's official OpenAI server image of the pinned release plus our plugin.
# Build: docker build -t razor-vllm .   Run: docker run --gpus all -p 8000:8000 razor-vllm MODEL
# Status: not yet built or run here (no Docker engine, no GPU); GPU kernels come with the GPU issue,
# until then the backend falls back to its PyTorch reference kernels on GPU tensors.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/razor-vllm
COPY setup.py pyproject.toml README.md ./
COPY razor_vllm ./razor_vllm
COPY configs ./configs
COPY csrc ./csrc
# vllm is already in the image: install our package without touching it or torch.
RUN pip install --no-cache-dir --no-deps . \
 && pip install --no-cache-dir "pydantic>=2.5" "pyyaml>=6" "tqdm>=4.60" "gguf>=0.10"

ENTRYPOINT ["vllm", "serve"]
CMD ["--help"]
