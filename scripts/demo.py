"""The main job: serve the default model with razor through `vllm serve` and answer a real request.

Prepares the model if needed, starts the OpenAI-compatible server on loopback, asks one chat
question, prints the answer (and razor's start-up line), and stops the server.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vllm serve exited with code {server.returncode} before becoming healthy")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"server not healthy after {timeout:.0f}s")


def chat(url: str, model: str, question: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 48, "temperature": 0}
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--kv-gib", type=float, default=2.0, help="KV cache size (explicit on CPU)")
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--backend", default="razor", help="attention backend (razor, or e.g. CPU_ATTN for stock)")
    args = parser.parse_args()

    from razor_vllm.model import prepare_default_model

    model_dir = prepare_default_model()
    vllm = Path(sys.executable).with_name("vllm")
    url = f"http://127.0.0.1:{args.port}"
    cmd = [
        str(vllm), "serve", str(model_dir),
        "--attention-backend", args.backend,
        "--host", "127.0.0.1", "--port", str(args.port),
        "--max-model-len", "8192",
        # fp32: this model's first answer token is a near-tie that bf16 can flip (README), and CPUs
        # without bf16 instructions run bf16 several times slower.
        "--dtype", "float32",
        "--max-num-batched-tokens", "512",
        "--kv-cache-memory-bytes", str(int(args.kv_gib * (1 << 30))),
        "--served-model-name", "smollm2-135m-instruct",
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    log_path = Path("out") / "demo-server.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(url, server, timeout=600)
            razor_lines = [line.strip() for line in log_path.read_text().splitlines() if "RAZOR:" in line]
            for line in razor_lines:
                print(line)
            answer = chat(url, "smollm2-135m-instruct", args.question)
            print(f"\nQ: {args.question}\nA: {answer}")
            return 0 if answer.strip() else 1
        finally:
            stop(server)


def stop(server: subprocess.Popen) -> None:
    """Stop the server and the engine processes it started (its own process group)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
