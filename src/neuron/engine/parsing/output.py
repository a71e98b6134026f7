"""A model's output, split as it streams into answer text, reasoning and tool calls.

Text arrives in pieces (whatever the detokenizer released). Markers (`<think>`, `<tool_call>`,
`[TOOL_CALLS]`, ...) may be cut across pieces, so text that could begin one is held back until
the next piece tells. Whitespace around the markers is dropped: it belongs to the markup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from neuron.engine.parsing.json_calls import CallArguments, CallEnd, CallPiece, CallScanner, CallStart, NotJson
from neuron.engine.parsing.syntax import THINK_CLOSE, THINK_OPEN, ToolSyntax


@dataclass(frozen=True, slots=True)
class Content:
    text: str


@dataclass(frozen=True, slots=True)
class Thought:
    text: str


@dataclass(frozen=True, slots=True)
class Call:
    """A tool call piece: the first for an index has id and name, the rest argument text."""

    index: int
    id: str | None
    name: str | None
    arguments: str


Parsed = Content | Thought | Call


class Parser(Protocol):
    calls: int
    ended: bool

    def push(self, text: str) -> list[Parsed]: ...
    def finish(self) -> list[Parsed]: ...


class PlainText:
    """No tools, no reasoning: the output is the answer, unchanged."""

    calls = 0
    ended = False

    def push(self, text: str) -> list[Parsed]:
        return [Content(text)] if text else []

    def finish(self) -> list[Parsed]:
        return []


_NAME_START = '{"name"'


class OutputParser:
    def __init__(
        self, syntax: ToolSyntax | None, *, reasoning: bool, thinking: bool, max_calls: int | None = None
    ) -> None:
        self._syntax = syntax
        self._reasoning = reasoning  # `<think>` is a marker for this model
        self._state = "reasoning" if thinking else "content"
        self._max_calls = max_calls
        self._held = ""
        self._trim = thinking  # drop whitespace at the start of the segment being written
        self._answered = False  # the answer has begun (Llama 3's bare JSON call must come first)
        self._scanner: CallScanner | None = None
        self._body = ""  # the raw text of the tool-call body being read, in case it is not JSON
        self._opener = ""
        self._body_calls = 0
        self._call_open = False
        self.calls = 0
        self.ended = False

    def push(self, text: str) -> list[Parsed]:
        out: list[Parsed] = []
        buf, self._held = self._held + text, ""
        while buf and not self.ended:
            if self._state == "tool":
                buf = self._tool(buf, out)
            elif self._state == "between_calls":
                buf = self._between_calls(buf)
            elif self._state == "after_call":
                buf = self._after_call(buf)
            else:
                buf = self._text(buf, out)
        return out

    def finish(self) -> list[Parsed]:
        out: list[Parsed] = []
        held, self._held = self._held, ""
        if self._state == "tool" and self._scanner is not None:
            if self._body_calls == 0:  # cut off before a call took shape
                out.append(Content(self._opener + self._body))
                return out
            self._pieces(self._scanner.finish(), out)
            if self._call_open:
                self._end_call()
        elif self._state in ("content", "reasoning") and held.strip():
            self._write(held, out)
        elif self._state == "content" and held and not self._trim:
            out.append(Content(held))
        return out

    # --- text: the answer or the reasoning -----------------------------------------------------

    def _markers(self) -> list[str]:
        if self._state == "reasoning":
            return [THINK_CLOSE]
        markers = [THINK_OPEN] if self._reasoning else []
        return markers + list(self._syntax.opens if self._syntax else ())

    def _text(self, buf: str, out: list[Parsed]) -> str:
        if self._state == "content" and self._bare_json_possible():
            decided = self._bare_json(buf)
            if decided is None:
                self._held = buf
                return ""
            if decided:
                self._open_tool("")
                return buf.lstrip()
        hit = _first(buf, self._markers())
        if hit is not None:
            at, marker = hit
            self._write(buf[:at].rstrip(), out)
            self._switch(marker)
            return buf[at + len(marker) :]
        keep = _partial_suffix(buf, self._markers())
        if self._syntax is not None or self._reasoning:
            head = buf[: len(buf) - keep]
            keep += len(head) - len(head.rstrip())  # whitespace before a marker belongs to the markup
        self._write(buf[: len(buf) - keep], out)
        self._held = buf[len(buf) - keep :]
        return ""

    def _write(self, text: str, out: list[Parsed]) -> None:
        if self._trim:
            text = text.lstrip()
        if not text:
            return
        self._trim = False
        if self._state == "reasoning":
            out.append(Thought(text))
        else:
            self._answered = True
            out.append(Content(text))

    def _switch(self, marker: str) -> None:
        if marker == THINK_OPEN:
            self._state, self._trim = "reasoning", True
        elif marker == THINK_CLOSE:
            self._state, self._trim = "content", True
        else:
            self._open_tool(marker)

    def _bare_json_possible(self) -> bool:
        return self._syntax is not None and self._syntax.bare_json and not self._answered

    @staticmethod
    def _bare_json(buf: str) -> bool | None:
        """Whether an answer starting with `buf` is a bare JSON call; None while it cannot tell."""
        compact = re.sub(r"\s", "", buf)
        if not compact or (len(compact) < len(_NAME_START) and _NAME_START.startswith(compact)):
            return None
        return compact.startswith(_NAME_START)

    # --- tool calls -----------------------------------------------------------------------------

    def _open_tool(self, opener: str) -> None:
        assert self._syntax is not None
        self._state = "tool"
        self._scanner = CallScanner(array=self._syntax.array)
        self._body, self._opener, self._body_calls = "", opener, 0

    def _tool(self, buf: str, out: list[Parsed]) -> str:
        assert self._scanner is not None and self._syntax is not None
        self._body += buf
        try:
            self._pieces(self._scanner.feed(buf), out)
        except NotJson as exc:
            self._pieces(exc.pieces, out)
            return self._not_a_call(out)
        if not self._scanner.done:
            return ""
        rest = self._scanner.rest
        self._scanner = None
        self._trim = True
        if self._syntax.separator:
            self._state = "between_calls"
        else:
            self._state = "after_call" if self._syntax.close else "content"
        return rest

    def _between_calls(self, buf: str) -> str:
        """After a call in a family that separates calls (Llama 3's `;`): another call, or the end of them."""
        assert self._syntax is not None and self._syntax.separator is not None
        stripped = buf.lstrip()
        if not stripped:
            self._held = buf
            return ""
        if stripped.startswith(self._syntax.separator):
            self._open_tool(self._opener)
            return stripped[len(self._syntax.separator) :]
        self._state = "after_call" if self._syntax.close else "content"
        return buf

    def _not_a_call(self, out: list[Parsed]) -> str:
        """The text after the marker is not a call: if nothing of one was reported, it is answer text;
        a call already reported is closed as it stands."""
        self._state, self._scanner, self._trim = "content", None, True
        if self._call_open:
            self._end_call()
        elif self._body_calls == 0:
            self._answered, self._trim = True, False
            out.append(Content(self._opener + self._body))
        return ""

    def _pieces(self, pieces: list[CallPiece], out: list[Parsed]) -> None:
        assert self._syntax is not None
        for piece in pieces:
            if self.ended:  # the one call allowed is complete; what follows is not reported
                return
            if isinstance(piece, CallStart):
                out.append(Call(self.calls, self._syntax.call_id(), piece.name, ""))
                self._body_calls += 1
                self._call_open = True
            elif isinstance(piece, CallArguments):
                out.append(Call(self.calls, None, None, piece.text))
            elif isinstance(piece, CallEnd):
                self._end_call()

    def _end_call(self) -> None:
        self._call_open = False
        self.calls += 1
        if self._max_calls is not None and self.calls >= self._max_calls:
            self.ended = True

    def _after_call(self, buf: str) -> str:
        assert self._syntax is not None and self._syntax.close is not None
        close = self._syntax.close
        stripped = buf.lstrip()
        if not stripped or (len(stripped) < len(close) and close.startswith(stripped)):
            self._held = buf
            return ""
        self._state = "content"
        return stripped[len(close) :] if stripped.startswith(close) else buf


def _first(buf: str, markers: list[str]) -> tuple[int, str] | None:
    hits = [(buf.find(m), m) for m in markers if m in buf]
    return min(hits) if hits else None


def _partial_suffix(buf: str, markers: list[str]) -> int:
    """The length of the longest end of `buf` that is the start of a marker."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(buf)), best, -1):
            if buf.endswith(marker[:k]):
                best = k
                break
    return best
