"""The synthetic long-context tasks and the Moby-Dick corpus (razor_vllm.eval): lengths, needle depths,
determinism, solvability and scoring, measured with the default model's real tokenizer. No engine."""

from __future__ import annotations

import collections
import re

import pytest

from razor_vllm.eval import corpus, tasks
from razor_vllm.eval.tasks import TASKS, Sample, make_samples, score

needs_model = pytest.mark.default_model  # the default model's tokenizer
DEPTH_TASKS = [name for name, spec in TASKS.items() if spec.uses_depth]
LENGTHS = (512, 2048, 8192)
# Every haystack unit is at most one word (a few tokens) and prompts never run over.
LENGTH_TOLERANCE = 8
# Filler sentences are <= 6 tokens, so the nearest sentence boundary is within a few tokens of the target;
# Moby-Dick's sentences are longer (median 23 tokens, p99 121), so "text" needles sit within about half of one.
DEPTH_TOLERANCE = {"noise": 8, "text": 96}
NEEDLE = re.compile(r"(The special magic \w+ for \w+ is [\w-]+\.|The pass key is \d+\. Remember it\.) ?")


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def split_prompt(sample: Sample) -> tuple[str, str, str]:
    """(header, haystack body, footer ending in the answer prefix): haystack tasks frame the body with blank
    lines; common_words puts its list on one line."""
    sep = "\n" if sample.task == "common_words" else "\n\n"
    start = sample.prompt.index(sep) + len(sep)
    end = sample.prompt.rindex(sep)
    return sample.prompt[:start], sample.prompt[start:end], sample.prompt[end:]


def measured_depth(tokenizer, sample: Sample) -> tuple[float, int]:
    """Where the queried needle really is: haystack tokens before it / all haystack tokens (needles removed)."""
    _, body, _ = split_prompt(sample)
    at = body.index(sample.answers[0])
    start = body.rindex("The ", 0, at)  # the needle's first word
    before = NEEDLE.sub("", body[:start]).strip()
    total = count(tokenizer, NEEDLE.sub("", body).strip())
    return count(tokenizer, before) / total, total


@needs_model
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("task", list(TASKS))
def test_prompts_hit_the_length_and_are_solvable(tokenizer, task, length):
    depth = 0.5 if TASKS[task].uses_depth else None
    samples = make_samples(task, tokenizer, length, 2, seed=1, depth=depth)
    for sample in samples:
        assert sample.task == task and sample.depth == depth
        assert sample.context_tokens == len(tokenizer.encode(sample.prompt))
        assert length - LENGTH_TOLERANCE <= sample.context_tokens <= length, sample.context_tokens
        _, body, footer = split_prompt(sample)
        for answer in sample.answers:
            assert answer in body, (answer, task)
            assert answer.lower() not in footer.lower(), (answer, footer)
        assert sample.max_tokens >= count(tokenizer, " " + ", ".join(sample.answers))
    assert samples[0].prompt != samples[1].prompt and samples[0].answers != samples[1].answers


@needs_model
@pytest.mark.parametrize("haystack", ["noise", "text"])
@pytest.mark.parametrize("task", DEPTH_TASKS)
def test_needle_sits_at_the_requested_depth(tokenizer, task, haystack):
    for length, depths in ((512, (0.0, 0.3, 1.0)), (2048, (0.1, 0.5, 0.9)), (8192, (0.25, 0.75))):
        for depth in depths:
            sample = make_samples(task, tokenizer, length, 1, seed=3, depth=depth, haystack=haystack)[0]
            assert length - LENGTH_TOLERANCE <= sample.context_tokens <= length, sample.context_tokens
            actual, hay_tokens = measured_depth(tokenizer, sample)
            assert abs(actual - depth) * hay_tokens <= DEPTH_TOLERANCE[haystack], (length, depth, actual)
            if haystack == "text":  # needles go between sentences
                _, body, _ = split_prompt(sample)
                start = body.rindex("The ", 0, body.index(sample.answers[0]))
                assert start == 0 or re.search(r"[.!?][\"'”’)]* $", body[:start]), body[start - 40 : start]


@needs_model
def test_depth_none_draws_one_per_sample(tokenizer):
    samples = make_samples("niah_number", tokenizer, 512, 4, seed=0)
    depths = [s.depth for s in samples]
    assert all(0 <= d <= 1 for d in depths) and len(set(depths)) == 4
    for sample in samples:
        actual, hay_tokens = measured_depth(tokenizer, sample)
        assert abs(actual - sample.depth) * hay_tokens <= DEPTH_TOLERANCE["noise"]


@needs_model
@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_per_seed_and_different_across_seeds(tokenizer, task):
    depth = 0.4 if TASKS[task].uses_depth else None
    first = make_samples(task, tokenizer, 512, 3, seed=7, depth=depth)
    assert make_samples(task, tokenizer, 512, 3, seed=7, depth=depth) == first
    other = make_samples(task, tokenizer, 512, 3, seed=8, depth=depth)
    assert len({s.prompt for s in first + other}) == 6
    assert len({s.answers for s in first + other}) == 6
    assert len({s.seed for s in first + other}) == 6


@needs_model
def test_same_needles_across_lengths_and_depths(tokenizer):
    # A grid compares like with like: sample i asks the same question at every length and depth.
    a = make_samples("multikey", tokenizer, 512, 2, seed=5, depth=0.1)
    b = make_samples("multikey", tokenizer, 2048, 2, seed=5, depth=0.9)
    assert [s.answers for s in a] == [s.answers for s in b]
    assert [split_prompt(s)[2] for s in a] == [split_prompt(s)[2] for s in b]


@needs_model
def test_passkey_uses_the_ruler_filler(tokenizer):
    sample = make_samples("passkey", tokenizer, 512, 1, seed=0, depth=0.5)[0]
    _, body, footer = split_prompt(sample)
    assert tasks.FILLER in body
    assert f"The pass key is {sample.answers[0]}." in body
    assert footer.endswith("The pass key is")
    assert re.fullmatch(r"\d{7}", sample.answers[0])


@needs_model
def test_multikey_has_distractor_needles_of_other_keys(tokenizer):
    sample = make_samples("multikey", tokenizer, 2048, 1, seed=2, depth=0.5)[0]
    _, body, footer = split_prompt(sample)
    needles = re.findall(r"The special magic number for (\w+) is (\d+)\.", body)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4 and len({v for _, v in needles}) == 4
    query = re.search(r"The special magic number for (\w+) is$", footer).group(1)
    assert dict(needles)[query] == sample.answers[0]


@needs_model
def test_niah_uuid_answers_a_uuid(tokenizer):
    sample = make_samples("niah_uuid", tokenizer, 512, 1, seed=0, depth=0.5)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", sample.answers[0])
    key = re.search(r"The special magic uuid for (\w+) is$", split_prompt(sample)[2]).group(1)
    assert f"The special magic uuid for {key} is {sample.answers[0]}." in split_prompt(sample)[1]


@needs_model
@pytest.mark.parametrize("haystack", ["noise", "text"])
def test_variable_tracking_chain_resolves_to_the_answers(tokenizer, haystack):
    sample = make_samples("variable_tracking", tokenizer, 2048, 1, seed=4, haystack=haystack)[0]
    _, body, footer = split_prompt(sample)
    value = re.search(r"assigned the value (\d+) are: VAR$", footer).group(1)
    # Follow the assignments in reading order, as the model must.
    bound: dict[str, str] = {}
    statements = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", body)
    for name, source in statements:
        bound[name] = bound[source[4:]] if source.startswith("VAR ") else source
    assert sorted(n for n, v in bound.items() if v == value) == sorted(sample.answers)
    assert len(statements) == len(sample.answers) == 5
    # Hops are spread through the filler, not stated together.
    positions = [body.index(f"VAR {name} =") for name in sample.answers]
    assert positions == sorted(positions) and positions[-1] - positions[0] > len(body) / 4


@needs_model
@pytest.mark.parametrize("length", (512, 8192))
def test_common_words_answers_are_the_most_frequent(tokenizer, length):
    sample = make_samples("common_words", tokenizer, length, 1, seed=6)[0]
    _, body, footer = split_prompt(sample)
    words = re.findall(r"\d+\. (\w+)", body)
    counts = collections.Counter(words)
    assert len(sample.answers) == 10 and "10 most common" in footer
    answer_counts = [counts[w] for w in sample.answers]
    rare_counts = [c for w, c in counts.items() if w not in sample.answers]
    assert min(answer_counts) > max(rare_counts), (answer_counts, max(rare_counts))
    assert len(rare_counts) > 10  # mostly rare words


def test_score_is_the_fraction_of_answers_found():
    one = Sample("niah_number", "...", ("1234567",), 3, 0.5, 0, 16)
    assert score(one, " 1234567.") == 1.0
    assert score(one, " 123456.") == 0.0
    assert score(one, " 12345678") == 0.0  # a whole match, not a substring
    assert score(one, "") == 0.0
    chain = Sample("variable_tracking", "...", ("ABCDE", "FGHIJ", "KLMNO", "PQRST"), 3, None, 0, 40)
    assert score(chain, " VAR ABCDE, VAR FGHIJ, VAR KLMNO, VAR PQRST") == 1.0
    assert score(chain, " VAR abcde, VAR FGHIJ, VAR ZZZZZ") == 0.5  # case-insensitive, partial credit
    assert score(chain, " VAR ABCDEF") == 0.0
    uid = Sample("niah_uuid", "...", ("0f8e2c4a-1b2c-4d5e-8f90-a1b2c3d4e5f6",), 3, 0.5, 0, 40)
    assert score(uid, " 0f8e2c4a-1b2c-4d5e-8f90-a1b2c3d4e5f6.") == 1.0
    assert score(uid, " 0f8e2c4a-1b2c-4d5e-8f90-a1b2c3d4e5f") == 0.0


@needs_model
def test_bad_requests_get_clear_errors(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'nope'.*passkey"):
        make_samples("nope", tokenizer, 512, 1, seed=0)
    with pytest.raises(ValueError, match="haystack must be one of"):
        make_samples("passkey", tokenizer, 512, 1, seed=0, haystack="essay")
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        make_samples("passkey", tokenizer, 512, 1, seed=0, depth=1.5)
    with pytest.raises(ValueError, match="has no needle depth"):
        make_samples("variable_tracking", tokenizer, 512, 1, seed=0, depth=0.5)
    with pytest.raises(ValueError, match="too small"):
        make_samples("variable_tracking", tokenizer, 60, 1, seed=0)
    with pytest.raises(TypeError, match="num_hop"):
        make_samples("variable_tracking", tokenizer, 512, 1, seed=0, num_hop=3)


@needs_model
def test_task_options(tokenizer):
    sample = make_samples("variable_tracking", tokenizer, 1024, 1, seed=0, num_hops=2, num_chains=2)[0]
    assert len(sample.answers) == 3 and len(re.findall(r"VAR [A-Z]{5} = ", sample.prompt)) == 6
    sample = make_samples("multikey", tokenizer, 1024, 1, seed=0, depth=0.5, num_distractors=6)[0]
    assert len(re.findall(r"The special magic number for \w+ is \d+\.", sample.prompt)) == 7


# --- corpus ----------------------------------------------------------------------------------------------


def test_corpus_has_the_whole_novel():
    chapters = corpus.load_chapters()
    assert [c.number for c in chapters] == list(range(1, 136))
    assert chapters[0].title == "Loomings." and chapters[0].text.startswith("Call me Ishmael.")
    assert chapters[-1].title == "The Chase.—Third Day."
    assert sum(len(c.text) for c in chapters) > 1_000_000


@needs_model
@pytest.mark.parametrize("tokens,start", [(512, 1), (2048, 1), (8192, 40)])
def test_natural_text_hits_its_length(tokenizer, tokens, start):
    text = corpus.natural_text(tokenizer, tokens, start_chapter=start)
    n = count(tokenizer, text)
    assert 0.9 * tokens <= n <= tokens, n
    book = "\n\n".join(c.as_text() for c in corpus.load_chapters()[start - 1 :])
    assert book.startswith(text) and text.startswith(f"CHAPTER {start}. ")
    # Cut at the last sentence end that fits: one more sentence would not.
    next_end = min(end for end in corpus.sentence_ends(book) if end > len(text))
    assert count(tokenizer, book[:next_end]) > tokens
    assert re.search(r"[.!?][\"'”’)]*$", text)


@needs_model
def test_natural_text_rejects_impossible_requests(tokenizer):
    with pytest.raises(ValueError, match="start_chapter"):
        corpus.natural_text(tokenizer, 100, start_chapter=0)
    with pytest.raises(ValueError, match="fewer than"):
        corpus.natural_text(tokenizer, 100_000, start_chapter=130)


@needs_model
def test_text_haystack_is_moby_dick(tokenizer):
    sample = make_samples("niah_number", tokenizer, 1024, 1, seed=0, depth=0.5, haystack="text")[0]
    _, body, _ = split_prompt(sample)
    sentences = [s for s in corpus.sentences() if len(s) > 40 and s in body]
    assert len(sentences) >= 5


def test_missing_corpus_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("RAZOR_VLLM_CACHE", str(tmp_path))
    with pytest.raises(corpus.CorpusMissing, match=re.escape(corpus.SETUP_COMMAND)):
        corpus.load_chapters()


def test_corpus_install_rejects_a_tarball_that_fails_the_integrity_check(tmp_path):
    with pytest.raises(RuntimeError, match="integrity"):
        corpus.ensure_corpus(tmp_path / "corpus", tarball=b"not the registry's tarball")
    assert not (tmp_path / "corpus").exists()


@needs_model
@pytest.mark.parametrize("task", ["passkey", "niah_number", "multikey", "variable_tracking"])
def test_calibration_split_has_other_seeds_and_wording(tokenizer, task):
    """Settings are chosen on the calibration split: its prompts share no needle value and (for the
    needle tasks) no filler or needle wording with the evaluation split, and are as long and solvable."""
    depth = 0.5 if TASKS[task].uses_depth else None
    evaluation = make_samples(task, tokenizer, 1024, 3, seed=0, depth=depth)
    calibration = make_samples(task, tokenizer, 1024, 3, seed=0, depth=depth, split="calibration")
    assert not {a for s in evaluation for a in s.answers} & {a for s in calibration for a in s.answers}
    assert not {s.seed for s in evaluation} & {s.seed for s in calibration}
    for sample in calibration:
        assert 1024 - LENGTH_TOLERANCE <= sample.context_tokens <= 1024
        assert all(a in sample.prompt for a in sample.answers)
        if task != "variable_tracking":
            assert tasks.FILLER_SENTENCES[0] not in sample.prompt and "The river runs to the sea." in sample.prompt
            assert "pass key" not in sample.prompt and "special magic" not in sample.prompt
    with pytest.raises(ValueError, match="split must be one of"):
        make_samples("passkey", tokenizer, 512, 1, seed=0, split="train")


@needs_model
@pytest.mark.parametrize("split", ["evaluation", "calibration"])
@pytest.mark.parametrize("task", ["passkey", "niah_number"])
def test_prompts_of_one_depth_share_their_tokens_up_to_the_needle(tokenizer, task, split):
    """The noise haystack runs forward from its first sentence, so an engine with prefix caching computes the
    part before the needle once per task and depth: the prompts' common token prefix reaches the needle."""
    for length, depth in ((1024, 0.25), (4096, 0.75)):
        samples = make_samples(task, tokenizer, length, 6, seed=3, depth=depth, split=split)
        ids = [tokenizer.encode(s.prompt) for s in samples]
        common = min(next(i for i, (a, b) in enumerate(zip(ids[0], other)) if a != b) for other in ids[1:])
        assert common >= depth * length - 64, (common, depth * length)
        # ... and no further: the needles themselves differ.
        first_needle = min(len(tokenizer.encode(s.prompt[: s.prompt.index(s.answers[0])])) for s in samples)
        assert common <= first_needle, (common, first_needle)
