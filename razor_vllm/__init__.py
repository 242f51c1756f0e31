"""razor-vllm: RazorAttention KV-cache compression as a vLLM attention backend."""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _CheckoutTritonKernels(importlib.abc.MetaPathFinder):
    """``razor_vllm.triton_kernels`` lives in the top-level folder triton_kernels/ (setup.py's
    ``package_dir``). Imported from a source checkout on PYTHONPATH (e.g. a git worktree), it must
    come from that checkout: otherwise the editable install's finder maps it to the folder of
    whichever checkout was installed, and a worktree silently runs (and tests) another checkout's
    Triton kernels. (configs/ is data only and still resolves through the installed mapping.)"""

    def __init__(self, root: Path) -> None:
        self.init = root / "triton_kernels" / "__init__.py"

    def find_spec(self, name, path=None, target=None):
        if name != f"{__package__}.triton_kernels":
            return None
        folder = [str(self.init.parent)]
        return importlib.util.spec_from_file_location(name, self.init, submodule_search_locations=folder)


_root = Path(__file__).resolve().parent.parent
if (_root / "setup.py").exists() and (_root / "triton_kernels" / "__init__.py").exists():  # a checkout, not a wheel
    if not any(type(f).__name__ == "_CheckoutTritonKernels" for f in sys.meta_path):  # once, even if reloaded
        sys.meta_path.insert(0, _CheckoutTritonKernels(_root))
