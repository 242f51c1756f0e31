"""Moved to :mod:`razor_vllm.common.runinfo`; this name stays an alias of that very module for old imports."""

import sys

from razor_vllm.common import runinfo

sys.modules[__name__] = runinfo
