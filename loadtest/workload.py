"""The requests of the load test and the soak: short chat questions and passkey retrieval prompts.

Plain Python (no locust, no vLLM), so the locustfile, the soak and the tests build the same prompts.
A passkey prompt hides "The pass key is NNNNNNN." at a random depth in repeated filler and ends with
"The pass key is" (completion style, as tests/engine/test_engine_razor.py); the answer is checkable: the
first run of digits in the completion must be the key. Lengths are in tokens of the default model's
tokenizer, approximated from the filler (24 tokens per repeat); the server reports the exact count
in ``usage.prompt_tokens``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
FILLER_TOKENS = 24  # SmolLM2's tokenizer: 24.0 tokens per repeat of FILLER
NEEDLE_TOKENS = 17  # "The pass key is NNNNNNN. Remember it. " plus the closing question, about
PASSKEY_MAX_TOKENS = 10  # " 7481923." is 9 tokens (digits are single tokens)

# Short chat turns, the kind a chat front-end sends; answers are free text (not checked).
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning Python.",
    "Explain what a CPU cache is in two sentences.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a small bakery.",
    "How many days are there in a leap year?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue? Answer briefly.",
    "Write one sentence about autumn.",
    "What does HTTP stand for?",
    "Name three planets of the solar system.",
]

_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Passkey:
    """A retrieval prompt and the key it hides."""

    prompt: str
    key: str
    approx_tokens: int
    depth: float  # where the needle sits in the filler, 0 = start, 1 = end

    def check(self, completion: str) -> bool:
        """True when the first run of digits in the completion is exactly the key."""
        return answer_digits(completion) == self.key


def answer_digits(completion: str) -> Optional[str]:
    match = _DIGITS.search(completion)
    return match.group(0) if match else None


def passkey_prompt(key: str, tokens: int, depth: float) -> Passkey:
    """A prompt of about ``tokens`` tokens with the needle at ``depth`` (0..1) of the filler."""
    if not key.isdigit():
        raise ValueError(f"passkey must be digits, got {key!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    repeats = max(2, round((tokens - NEEDLE_TOKENS) / FILLER_TOKENS))
    before = round(repeats * depth)
    prompt = FILLER * before + f"The pass key is {key}. Remember it. " + FILLER * (repeats - before) + "The pass key is"
    return Passkey(prompt=prompt, key=key, approx_tokens=repeats * FILLER_TOKENS + NEEDLE_TOKENS, depth=depth)


def random_passkey(rng: random.Random, token_range: tuple[int, int]) -> Passkey:
    """A fresh 7-digit key, a length drawn from ``token_range`` and a depth in [0.1, 0.9]."""
    low, high = token_range
    key = str(rng.randrange(1_000_000, 10_000_000))
    return passkey_prompt(key, rng.randint(low, high), round(rng.uniform(0.1, 0.9), 3))


def parse_token_range(text: str) -> tuple[int, int]:
    """``"128-512"`` -> (128, 512); a single number N -> (N, N)."""
    parts = text.split("-")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"expected a token range like 128-512, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or values[0] < 1 or values[0] > values[1]:
        raise ValueError(f"expected a token range LOW-HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return values[0], values[1]


def default_ranges(window: int, max_model_len: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Passkey prompt lengths: near the razor window (W/2 .. 2W) and far past it (4W .. the context).

    The far range stops 64 tokens short of ``max_model_len`` to leave room for the answer and the
    approximation of the token count.
    """
    top = max_model_len - PASSKEY_MAX_TOKENS - 64
    near = (max(32, window // 2), min(2 * window, top))
    far_low = min(4 * window, top)
    if far_low <= near[1]:
        raise ValueError(
            f"max_model_len {max_model_len} leaves no room for prompts far past the window {window} "
            f"(need more than {4 * window + PASSKEY_MAX_TOKENS + 64})"
        )
    return near, (far_low, top)
