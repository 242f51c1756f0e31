"""Synthetic long-context tasks in the style of RULER and needle-in-a-haystack, generated locally from a seed.

Every prompt is completion style: the facts to retrieve are stated somewhere in a long context and the prompt
ends with the answer prefix the model completes ("... The pass key is"), which a 135M model answers far more
reliably than a question. ``make_samples`` fits each prompt to ``context_tokens`` tokens of the given
tokenizer (to within about one word, never over) and puts the needle at ``depth``: the fraction of the
haystack's tokens before it, rounded to the nearest sentence boundary (filler sentences are ~5 tokens; corpus
sentences ~25 on average).

Randomness: sample ``i`` of ``make_samples(..., seed=s)`` draws everything from its own stream, seeded with
``sample_seed(s, i)`` (recorded in ``Sample.seed``). The stream does not depend on the length or depth, so a
grid over lengths and depths asks the same needles everywhere and only the context changes.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import uuid
from dataclasses import dataclass, field
from typing import Callable

# RULER's noise haystack (and the passkey test's filler), one sentence per haystack unit.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLER_SENTENCES = tuple(s + "." for s in FILLER.rstrip(".").split(". "))
HAYSTACKS = ("noise", "text")

# Needle keys: short, common, single-word nouns (each must be told apart from the others in the answer prefix).
KEY_WORDS = tuple(
    """
    apple banana cherry grape lemon mango melon orange peach pear plum berry onion carrot potato tomato
    garlic pepper bread butter cheese honey sugar coffee tea milk river ocean forest desert island valley
    mountain garden meadow canyon harbor castle bridge tower temple village market palace library museum
    theater school station airport window mirror candle lantern blanket pillow basket bucket hammer ladder
    needle pencil rocket wagon saddle anchor compass helmet jacket violin guitar piano trumpet drum camera
    tiger lion zebra monkey rabbit turtle dolphin eagle falcon parrot salmon spider beetle wolf fox horse
    silver copper marble velvet cotton crystal diamond pearl ruby emerald thunder winter summer autumn spring
    """.split()
)
COMMON_SHARE = 0.3  # common_words: share of the list's entries taken by the frequent words (RULER: ~1/3)


@dataclass(frozen=True)
class Sample:
    task: str  # e.g. "niah_number"
    prompt: str  # completion-style text, ends with the answer prefix the model completes
    answers: tuple[str, ...]  # every string that must appear in the output (RULER "string match all")
    context_tokens: int  # measured length of the prompt in tokens of the given tokenizer
    depth: float | None  # needle depth in [0, 1] (fraction of the haystack before the needle), None if n/a
    seed: int  # this sample's own seed: sample_seed(seed passed to make_samples, index)
    max_tokens: int  # enough output tokens to hold the answers


@dataclass(frozen=True)
class _Needle:
    depth: float
    text: str


@dataclass(frozen=True)
class _Layout:
    """A haystack task before fitting: fixed text around a haystack, needles to place in it, the answers."""

    header: str
    footer: str  # ends with the answer prefix
    needles: tuple[_Needle, ...]
    answers: tuple[str, ...]
    answer_text: str  # what a correct completion looks like (sizes max_tokens)
    depth: float | None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    uses_depth: bool
    # (rng, depth) -> _Layout for haystack tasks; common_words builds its own list instead.
    layout: Callable[..., _Layout] | None = field(default=None, repr=False)


# --- the tasks -------------------------------------------------------------------------------------------


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_NIAH_HEADER = (
    "Some special magic {kind}s are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about them afterwards.\n\n"
)
_NIAH_NEEDLE = "The special magic {kind} for {key} is {value}."
_NIAH_FOOTER = "\n\nThe special magic {kind} for {key} is"


_PASSKEY_HEADER = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n"
)
# Prompt formats tuned on the default model (stock vLLM, fp32, greedy, ~1k tokens): a question line before
# the answer prefix, or a needle that ends "... is the pass key.", made it answer a copy of the wrong words.
_PASSKEY_NEEDLE = "The pass key is {key}. Remember it."
_PASSKEY_FOOTER = "\n\nThe pass key is"


# The calibration split (``make_samples(split="calibration")``): other seeds and other wording, so
# settings chosen on it (retrieval share, window) are not tuned to the evaluation prompts.
SPLITS = ("evaluation", "calibration")
_CALIBRATION_FILLER = (
    "The river runs to the sea. The hills are quiet at night. Birds fly south in the fall. We walk on."
)
_TEMPLATES = {
    "evaluation": dict(
        filler=FILLER_SENTENCES,
        passkey=(_PASSKEY_HEADER, _PASSKEY_NEEDLE, _PASSKEY_FOOTER),
        niah=(_NIAH_HEADER, _NIAH_NEEDLE, _NIAH_FOOTER),
    ),
    "calibration": dict(
        filler=tuple(s + "." for s in _CALIBRATION_FILLER.rstrip(".").split(". ")),
        passkey=(
            "A secret code is hidden somewhere in the text below. Keep it in mind.\n\n",
            "The secret code is {key}. Keep it safe.",
            "\n\nThe secret code is",
        ),
        niah=(
            "Some hidden {kind}s are placed in the text below. Remember them for later.\n\n",
            "The hidden {kind} of the {key} is {value}.",
            "\n\nThe hidden {kind} of the {key} is",
        ),
    ),
}


def _passkey(rng: random.Random, depth: float, split: str = "evaluation") -> _Layout:
    key = _number(rng)
    header, needle, footer = _TEMPLATES[split]["passkey"]
    return _Layout(
        header=header,
        footer=footer,
        needles=(_Needle(depth, needle.format(key=key)),),
        answers=(key,),
        answer_text=f" {key}.",
        depth=depth,
    )


def _niah(kind: str, value_of: Callable[[random.Random], str], distractors: int) -> Callable[..., _Layout]:
    def layout(
        rng: random.Random, depth: float, num_distractors: int = distractors, split: str = "evaluation"
    ) -> _Layout:
        header, needle, footer = _TEMPLATES[split]["niah"]
        if not 0 <= num_distractors < len(KEY_WORDS):
            raise ValueError(f"num_distractors must be in 0..{len(KEY_WORDS) - 1}, got {num_distractors}")
        keys = rng.sample(KEY_WORDS, 1 + num_distractors)
        values: list[str] = []
        while len(values) < len(keys):
            value = value_of(rng)
            if value not in values:
                values.append(value)
        # The queried needle at `depth`, the distractors (other keys, same format) anywhere.
        depths = [depth] + [rng.random() for _ in range(num_distractors)]
        needles = [_Needle(d, needle.format(kind=kind, key=k, value=v)) for d, k, v in zip(depths, keys, values)]
        return _Layout(
            header=header.format(kind=kind),
            footer=footer.format(kind=kind, key=keys[0]),
            needles=tuple(needles),
            answers=(values[0],),
            answer_text=f" {values[0]}.",
            depth=depth,
        )

    return layout


_VT_HEADER = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
# RULER's question ("Find all variables that are assigned the value ...") scored 0/4; ending on "VAR" makes
# the model list names.
_VT_FOOTER = "\n\nThe variables that are assigned the value {value} are: VAR"


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _variable_tracking(rng: random.Random, depth: None, num_hops: int = 4, num_chains: int = 1) -> _Layout:
    if num_hops < 1 or num_chains < 1:
        raise ValueError(f"num_hops and num_chains must be at least 1, got {num_hops} and {num_chains}")
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = _variable_name(rng)
        if name not in names:
            names.append(name)
    values = rng.sample(range(10000, 100000), num_chains)
    needles = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        statements = [f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        # Hops in order, spread over the whole context (sorted uniform depths).
        depths = sorted(rng.random() for _ in statements)
        needles += [_Needle(d, s) for d, s in zip(depths, statements)]
    query = names[: num_hops + 1]
    return _Layout(
        header=_VT_HEADER,
        footer=_VT_FOOTER.format(value=values[0]),
        needles=tuple(needles),
        answers=tuple(query),
        answer_text=" " + ", ".join(f"VAR {name}" for name in query),
        depth=None,
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("passkey", "a 7-digit pass key hidden in a long context", True, _passkey),
        TaskSpec(
            "niah_number", "the 7-digit special magic number for a word, one needle", True, _niah("number", _number, 0)
        ),
        TaskSpec("niah_uuid", "the special magic uuid for a word, one needle", True, _niah("uuid", _uuid, 0)),
        TaskSpec(
            "multikey",
            "the magic number for one word among 3 distractor needles of other words",
            True,
            _niah("number", _number, 3),
        ),
        TaskSpec(
            "variable_tracking",
            "all variables bound to a value through a 4-hop chain of VAR assignments",
            False,
            _variable_tracking,
        ),
        TaskSpec("common_words", "the 10 most frequent words of a long list of mostly rare words", False),
    )
}


# --- fitting a prompt to a length ------------------------------------------------------------------------


def _count(tokenizer, text: str, special: bool = True) -> int:
    return len(tokenizer.encode(text, add_special_tokens=special))


def _largest_fitting(render: Callable[[int], str], tokenizer, target: int, low: int, high: int) -> tuple[int, str]:
    """The largest n in [low, high] whose render(n) has at most ``target`` tokens (lengths grow with n)."""
    best = render(low)
    if _count(tokenizer, best) > target:
        raise ValueError(
            f"context_tokens={target} is too small for this task: its fixed text alone is "
            f"{_count(tokenizer, best)} tokens"
        )
    while low < high:
        mid = (low + high + 1) // 2
        prompt = render(mid)
        if _count(tokenizer, prompt) <= target:
            low, best = mid, prompt
        else:
            high = mid - 1
    return low, best


class _Haystack:
    """Sentences (filler or corpus), indexable without bounds; an excerpt is the last n words before ``end``."""

    def __init__(self, kind: str, rng: random.Random, tokenizer, split: str = "evaluation"):
        if kind == "noise":
            # Every excerpt starts at the first filler sentence and runs forward, so prompts of one task and
            # depth share their text (and tokens) up to the needle: with prefix caching (vLLM's default) an
            # engine computes that shared part once, which is what makes 20 prompts per cell affordable here.
            self.sentences: tuple[str, ...] = _TEMPLATES[split]["filler"]
            self.end = None
        elif kind == "text":
            from razor_vllm.eval import corpus

            self.sentences = corpus.sentences()
            self.end = rng.randrange(len(self.sentences))
        else:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {kind!r}")
        self.tokenizer = tokenizer
        self._tokens: dict[str, int] = {}

    def tokens(self, piece: str) -> int:
        """Tokens a piece adds after a space (BPE splits at spaces, so this is additive)."""
        if piece not in self._tokens:
            self._tokens[piece] = _count(self.tokenizer, " " + piece, special=False)
        return self._tokens[piece]

    def excerpt(self, words: int) -> list[str]:
        """Pieces: ``words`` words in all. Noise: whole sentences from the first one on, perhaps ending with
        the head of a sentence. Text: perhaps the tail of a sentence (an excerpt may start mid-sentence), then
        whole sentences up to a random place in the book."""
        pieces: list[str] = []
        if self.end is None:
            i = 0
            while words > 0:
                sentence_words = self.sentences[i % len(self.sentences)].split(" ")
                taken = sentence_words[:words]
                pieces.append(" ".join(taken))
                words -= len(taken)
                i += 1
            return pieces
        i = self.end
        while words > 0:
            i -= 1
            sentence_words = self.sentences[i % len(self.sentences)].split(" ")
            taken = sentence_words[-words:] if words < len(sentence_words) else sentence_words
            pieces.append(" ".join(taken))
            words -= len(taken)
        return pieces[::-1]

    def with_needles(self, pieces: list[str], needles: tuple[_Needle, ...]) -> str:
        """Join the pieces, each needle at the piece boundary (sentence end or the excerpt's start) nearest
        its depth in haystack tokens."""
        cumulative = [0]
        for piece in pieces:
            cumulative.append(cumulative[-1] + self.tokens(piece))
        slots: list[list[str]] = [[] for _ in cumulative]
        for needle in needles:
            target = needle.depth * cumulative[-1]
            slot = min(range(len(cumulative)), key=lambda j: (abs(cumulative[j] - target), j))
            slots[slot].append(needle.text)
        parts: list[str] = []
        for j, slot in enumerate(slots):
            parts += slot
            if j < len(pieces):
                parts.append(pieces[j])
        return " ".join(parts)


def _haystack_sample(
    spec: TaskSpec, tokenizer, target: int, rng: random.Random, depth: float | None, haystack: str, options: dict
) -> tuple[str, _Layout]:
    split = options.get("split", "evaluation")
    if spec.name in ("passkey",) or spec.name.startswith("niah") or spec.name.startswith("multikey"):
        layout = spec.layout(rng, depth, **options)
    else:  # variable tracking keeps its wording in both splits (its seeds still differ)
        layout = spec.layout(rng, depth, **{k: v for k, v in options.items() if k != "split"})
    hay = _Haystack(haystack, rng, tokenizer, split)

    def render(words: int) -> str:
        return layout.header + hay.with_needles(hay.excerpt(words), layout.needles) + layout.footer

    # Every word is at least one token, so `target` words is an upper bound.
    _, prompt = _largest_fitting(render, tokenizer, target, 0, target)
    return prompt, layout


_CWE_HEADER = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
_CWE_FOOTER = (
    "\nQuestion: What are the {count} most common words in the above list? "
    "Answer: The top {count} words that appear most often in the list are:"
)


def _common_words(
    tokenizer,
    target: int,
    rng: random.Random,
    num_common: int = 10,
    rare_repeats: int = 3,
    common_share: float = COMMON_SHARE,
) -> tuple[str, _Layout]:
    """A numbered list where ``num_common`` words repeat many times among rare ones (RULER's cwe): the
    frequent words fill ``common_share`` of the entries, every rare word appears ``rare_repeats`` times."""
    from razor_vllm.eval import corpus

    if num_common < 1 or rare_repeats < 1:
        raise ValueError(f"num_common and rare_repeats must be at least 1, got {num_common} and {rare_repeats}")
    if not 0 < common_share < 1:
        raise ValueError(f"common_share must be in (0, 1), got {common_share}")
    vocabulary = corpus.vocabulary()
    words = rng.sample(vocabulary, len(vocabulary))
    common, rare = words[:num_common], words[num_common:]
    order_seed = rng.getrandbits(64)
    header, footer = _CWE_HEADER, _CWE_FOOTER.format(count=num_common)
    common_min = rare_repeats + 2  # every frequent word stays clearly ahead of every rare one

    def render(entries: int) -> str:
        repeats = max(common_min, round(common_share * entries / num_common))
        rare_entries = max(0, entries - num_common * repeats)
        if math.ceil(rare_entries / rare_repeats) > len(rare):
            raise ValueError(f"context_tokens={target} needs more distinct words than the corpus has ({len(rare)})")
        listed = common * repeats + (rare[: math.ceil(rare_entries / rare_repeats)] * rare_repeats)[:rare_entries]
        random.Random(order_seed).shuffle(listed)
        return header + " ".join(f"{i + 1}. {word}" for i, word in enumerate(listed)) + footer

    low = num_common * common_min
    _, prompt = _largest_fitting(render, tokenizer, target, low, max(low, target))
    return prompt, _Layout(header, footer, (), tuple(common), " " + ", ".join(common), None)


# --- public API ------------------------------------------------------------------------------------------


def sample_seed(seed: int, index: int, split: str = "evaluation") -> int:
    """The seed of sample ``index`` of a run seeded with ``seed`` (48 bits of a hash: runs do not overlap,
    and the calibration split's seeds are another hash space than the evaluation's)."""
    key = f"{seed}/{index}" if split == "evaluation" else f"{split}/{seed}/{index}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "big")


def make_samples(
    task: str,
    tokenizer,
    context_tokens: int,
    num_samples: int,
    seed: int,
    depth: float | None = None,
    *,
    haystack: str = "noise",
    split: str = "evaluation",
    **options,
) -> list[Sample]:
    """``num_samples`` prompts of ``context_tokens`` tokens for ``task`` (see ``TASKS``).

    ``depth``: for tasks with ``uses_depth``, where the (queried) needle goes, in [0, 1]; None draws one per
    sample. ``haystack``: "noise" (repeated filler) or "text" (contiguous Moby-Dick sentences from a random
    place; needs the corpus). ``options``: task knobs (``num_distractors`` for niah/multikey, ``num_hops`` and
    ``num_chains`` for variable_tracking, ``num_common``, ``rare_repeats`` and ``common_share`` for
    common_words, whose list is the whole context, so it ignores ``haystack``).
    """
    spec = TASKS.get(task)
    if spec is None:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if depth is not None and not spec.uses_depth:
        raise ValueError(f"task {task!r} has no needle depth (its facts are spread over the context); pass depth=None")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    samples = []
    for index in range(num_samples):
        own_seed = sample_seed(seed, index, split)
        rng = random.Random(f"{task}/{own_seed}")
        if spec.layout is None:
            prompt, layout = _common_words(tokenizer, context_tokens, rng, **options)  # the list is the context
        else:
            sample_depth = depth
            if spec.uses_depth and sample_depth is None:
                sample_depth = random.Random(f"depth/{own_seed}").random()
            prompt, layout = _haystack_sample(
                spec, tokenizer, context_tokens, rng, sample_depth, haystack, dict(options, split=split)
            )
        samples.append(
            Sample(
                task=task,
                prompt=prompt,
                answers=layout.answers,
                context_tokens=_count(tokenizer, prompt),
                depth=layout.depth,
                seed=own_seed,
                max_tokens=_count(tokenizer, layout.answer_text, special=False) + 8,
            )
        )
    return samples


def _found(answer: str, text: str) -> bool:
    # A whole match: "1234567" is not found in "12345678", "pear" not in "spear".
    return re.search(rf"(?<![\w-]){re.escape(answer)}(?![\w-])", text, flags=re.IGNORECASE) is not None


def score(sample: Sample, output_text: str) -> float:
    """Fraction of ``sample.answers`` found (as whole words, case-insensitive) in ``output_text``."""
    return sum(_found(answer, output_text) for answer in sample.answers) / len(sample.answers)
