"""Reading vLLM's OpenAI streaming answers (server-sent events), for the locustfile and the soak.

Feed each line of the body to :meth:`StreamReader.feed`; it keeps the generated text, the finish
reason and the usage block (sent last when the request asks ``stream_options.include_usage``), and
raises on an error event, which vLLM sends inside a 200 stream when the engine fails mid-request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

STREAM_OPTIONS = {"stream": True, "stream_options": {"include_usage": True}}


class StreamError(RuntimeError):
    """The stream carried an error event or ended without ``[DONE]``."""


@dataclass
class StreamReader:
    chat: bool  # chat completions put text in choices[0].delta.content, completions in choices[0].text
    pieces: list[str] = field(default_factory=list)
    finish_reason: Optional[str] = None
    usage: Optional[dict] = None
    done: bool = False

    def feed(self, line: bytes | str) -> Optional[str]:
        """Take one line of the body; return the text it added ("" or None when none)."""
        if isinstance(line, bytes):
            line = line.decode()
        line = line.strip()
        if not line.startswith("data:"):
            return None
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            self.done = True
            return None
        event = json.loads(data)
        if "error" in event:
            raise StreamError(f"error event: {str(event['error'])[:300]}")
        self.usage = event.get("usage") or self.usage
        added = []
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if piece:
                added.append(piece)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        self.pieces.extend(added)
        return "".join(added)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def finish(self) -> None:
        """Call at the end of the body: a stream without [DONE] was cut short."""
        if not self.done:
            raise StreamError("stream ended without [DONE]")
