"""The one ``vllm serve`` that the serving tests share (tests/conftest.py: the ``razor_server`` fixture).

Its settings are the expectations those tests assert against, so they live here, next to nothing else.
fp32 so greedy answers are deterministic (the first token of "What is the capital of France?" is a
near tie in bf16, see README); the status plugin is allowlisted (``VLLM_PLUGINS``: endpoint plugins load
only when listed, and the list then filters the general plugins too); a window override that the
status route must show; ``--enforce-eager``: no torch.compile (minutes off the start on a CPU: README).
"""

from __future__ import annotations

import json

from razor_vllm.serve.harness import cli_args

# The test modules that use the shared server: run on one worker, which starts it once (conftest.py
# checks that no other module asks for it).
TEST_MODULES = ("tests/serving/test_server.py", "tests/serving/test_server_status.py")

MODEL = "smollm2-135m-instruct"  # the served name
MAX_MODEL_LEN = 2048
WINDOW = 96  # overrides the bundled profile's 128 (the status must show it); short chats stay inside it
KV_BYTES = 256 << 20

OPTIONS = {
    "--attention-backend": "razor",
    "--dtype": "float32",
    "--max-model-len": str(MAX_MODEL_LEN),
    "--max-num-batched-tokens": "512",
    "--max-num-seqs": "32",
    "--kv-cache-memory-bytes": str(KV_BYTES),
    "--served-model-name": MODEL,
    "--seed": "0",
    "--additional-config": json.dumps({"razor": {"window": WINDOW}}),
}
SERVER_ARGS = cli_args(OPTIONS, "--enforce-eager")
SERVER_ENV = {"VLLM_PLUGINS": "razor,razor_status"}
