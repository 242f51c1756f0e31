"""The main job: serve the default model with razor through `vllm serve` and answer a real request.

Prepares the model if needed, starts the OpenAI-compatible server on loopback (saying what it is doing
while it starts, with the elapsed time), prints razor's start-up line, streams the answer to one chat
question, and stops the server (its whole process group). The server's log: out/demo-server.log.

The server runs with ``--enforce-eager`` by default: on a CPU, vLLM's default compilation (torch.compile
with Inductor) makes the first start several times slower for no gain a newcomer would notice on one short
answer (measured: README, "Notes on the CPU build"); ``--compile`` keeps vLLM's default instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from razor_vllm.serve import harness

SERVED_NAME = "smollm2-135m-instruct"


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def server_args(backend: str, kv_gib: float, compile_model: bool) -> list[str]:
    options = {
        "--attention-backend": backend,
        "--max-model-len": 8192,
        # fp32: this model's first answer token is a near-tie that bf16 can flip (README), and CPUs
        # without bf16 instructions run bf16 several times slower.
        "--dtype": "float32",
        "--max-num-batched-tokens": 512,
        "--kv-cache-memory-bytes": int(kv_gib * (1 << 30)),
        "--served-model-name": SERVED_NAME,
    }
    return harness.cli_args(options) if compile_model else harness.cli_args(options, "--enforce-eager")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000, help="loopback port of the server (0: any free port)")
    parser.add_argument("--kv-gib", type=float, default=2.0, help="KV cache size (explicit on CPU)")
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--backend", default="razor", help="attention backend (razor, or e.g. CPU_ATTN for stock)")
    parser.add_argument("--compile", action="store_true", help="vLLM's default torch.compile (slow first start)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the server")
    args = parser.parse_args()

    t0 = time.monotonic()
    say("preparing the default model (SmolLM2-135M-Instruct; converted once, then cached)")
    from razor_vllm.model import prepare_default_model

    model_dir = prepare_default_model(progress=True)
    say(f"model ready in {time.monotonic() - t0:.0f} s: {model_dir}")

    log_path = Path("out") / "demo-server.log"
    cmd_args = server_args(args.backend, args.kv_gib, args.compile)
    mode = "vLLM's default compilation: the first start compiles" if args.compile else "eager mode, no compilation"
    say(f"starting vllm serve with the {args.backend} attention backend ({mode}); log: {log_path}")
    say("$ vllm serve " + " ".join([str(model_dir), *cmd_args]))
    try:
        with harness.vllm_server(
            model_dir, cmd_args, log_path=log_path, timeout=args.timeout, progress=say, port=args.port or None
        ) as server:
            for line in server.log_text().splitlines():
                if "RAZOR:" in line:
                    say("razor: " + line.split("RAZOR:", 1)[1].strip())
            say(f"server up at {server.url} after {server.startup_s:.0f} s; asking one question")
            print(f"\nQ: {args.question}\nA: ", end="", flush=True)
            t1 = time.monotonic()
            with server.client(timeout=300) as client:
                chunks = client.chat.completions.create(
                    model=SERVED_NAME,
                    messages=[{"role": "user", "content": args.question}],
                    max_tokens=48,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                answer = harness.Streamed()
                with chunks:
                    for chunk in chunks:
                        print(answer.add(chunk), end="", flush=True)
            print("\n")
            tokens = (answer.usage or {}).get("completion_tokens", len(answer.pieces))
            say(f"answered {tokens} tokens in {time.monotonic() - t1:.1f} s; stopping the server")
    except RuntimeError as exc:  # the server exited or did not become healthy: the message has the log's tail
        say(f"error: {exc}")
        return 1
    say(f"done in {time.monotonic() - t0:.0f} s")
    return 0 if answer.text.strip() else 1


if __name__ == "__main__":
    sys.exit(main())
