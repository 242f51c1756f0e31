"""razor-vllm: RazorAttention KV-cache compression as a vLLM attention backend."""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec, SourceFileLoader
from pathlib import Path

__version__ = "0.1.0"

# The GPU kernels live outside this folder (setup.py's package_dir: razor_vllm.triton_kernels is
# triton_kernels/). Installed, the wheel (or an editable install's finder) maps them. Run from a
# source checkout with PYTHONPATH=<checkout> (helpers' worktrees, the GPU check on a machine with
# nothing installed) they must come from *this* checkout, not from wherever an editable install
# points (before this finder, every worktree silently tested main's kernels): map them first, and
# only for a checkout. (razor_vllm.configs holds only data files; the installed copy serves.)
_CHECKOUT = Path(__file__).resolve().parent.parent
_KERNELS = "razor_vllm.triton_kernels"


class _CheckoutSubpackages:
    """Meta-path finder for razor_vllm.triton_kernels in a source checkout."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname != _KERNELS:
            return None
        init = _CHECKOUT / "triton_kernels" / "__init__.py"
        spec = ModuleSpec(fullname, SourceFileLoader(fullname, str(init)), origin=str(init), is_package=True)
        spec.has_location = True
        spec.submodule_search_locations = [str(init.parent)]
        return spec


if (_CHECKOUT / "setup.py").is_file() and (_CHECKOUT / "triton_kernels" / "__init__.py").is_file():
    if not any(isinstance(f, type) and f.__name__ == "_CheckoutSubpackages" for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutSubpackages)
