"""Tool calls written as JSON, read one character at a time.

Models write a call as `{"name": "f", "arguments": {...}}` (Hermes, Qwen, Mistral) or with
`"parameters"` (Llama 3). The name is reported as soon as its string closes and the arguments'
raw text as it arrives, so a client sees the call forming instead of waiting for the whole
object. Mistral writes a JSON array of calls; `array=True` reads one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass(frozen=True, slots=True)
class CallStart:
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    text: str


@dataclass(frozen=True, slots=True)
class CallEnd:
    pass


CallPiece = CallStart | CallArguments | CallEnd


class NotJson(ValueError):
    """The text is not the JSON this scanner expects (the caller treats it as plain text).

    `pieces` holds what the same feed had already read, before the text went wrong.
    """

    pieces: list[CallPiece] = []


class _Value:
    """One JSON value at a call's level, read raw: a string, a scalar, or a nested object or array."""

    def __init__(self, first: str, role: str) -> None:
        self.role = role  # key | name | args | skip
        self.raw = first
        self.kind = "string" if first == '"' else "nest" if first in "{[" else "scalar"
        self._level = 1 if self.kind == "nest" else 0
        self._in_string = first == '"'
        self._escaped = False

    def push(self, ch: str) -> tuple[bool, bool]:
        """(the value is complete, `ch` belonged to it)."""
        if self.kind == "scalar":
            if ch in ",}]" or ch.isspace():
                return True, False
            self.raw += ch
            return False, True
        self.raw += ch
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif ch == "\\":
                self._escaped = True
            elif ch == '"':
                self._in_string = False
                return self.kind == "string", True
            return False, True
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._level += 1
        elif ch in "}]":
            self._level -= 1
            return self._level == 0, True
        return False, True

    def text(self) -> str:
        """A string's decoded content (keys, names, arguments sent as a JSON string)."""
        try:
            text: str = json.loads(self.raw)  # the scanner saw a string here
            return text
        except json.JSONDecodeError as exc:
            raise NotJson(f"bad string {self.raw!r}") from exc


class CallScanner:
    def __init__(self, *, array: bool = False) -> None:
        self._array = array
        self._base = 2 if array else 1  # bracket depth at which a call's own keys live
        self._depth = 0
        self._value: _Value | None = None
        self._emitted = 0  # how much of a streaming arguments value has been reported
        self._new_call()
        self.done = False
        self.rest = ""  # what followed the closing bracket

    def _new_call(self) -> None:
        self._expect = "key"  # key | colon | value | comma
        self._key: str | None = None
        self._name: str | None = None
        self._started = False
        self._args_seen = False
        self._held: list[str] = []  # argument text read before the name

    @property
    def in_call(self) -> bool:
        return self._depth >= self._base

    def feed(self, text: str) -> list[CallPiece]:
        out: list[CallPiece] = []
        try:
            for i, ch in enumerate(text):
                if self.done:
                    self.rest += text[i:]
                    break
                self._char(ch, out)
        except NotJson as exc:
            self._stream_arguments(out)
            exc.pieces = out
            raise
        self._stream_arguments(out)
        return out

    def _char(self, ch: str, out: list[CallPiece]) -> None:
        if self._value is not None:
            complete, consumed = self._value.push(ch)
            if complete:
                self._value_done(out)
            if consumed:
                return
        if ch.isspace():
            return
        if self._depth < self._base:
            self._between_calls(ch)
        else:
            self._at_call_level(ch, out)

    def _between_calls(self, ch: str) -> None:
        if self._array and self._depth == 0:
            if ch != "[":
                raise NotJson(f"expected '[', got {ch!r}")
            self._depth = 1
        elif ch == "{":
            self._depth += 1
            self._new_call()
        elif self._array and ch == ",":
            pass
        elif self._array and ch == "]":
            self._depth = 0
            self.done = True
        else:
            raise NotJson(f"expected '{{', got {ch!r}")

    def _at_call_level(self, ch: str, out: list[CallPiece]) -> None:
        if self._expect == "key" and ch == '"':
            self._value = _Value(ch, "key")
        elif self._expect == "colon" and ch == ":":
            self._expect = "value"
        elif self._expect == "value":
            role = "skip"
            if self._key in ARGUMENT_KEYS and not self._args_seen:
                role, self._args_seen, self._emitted = "args", True, 0
            elif self._key == "name":
                role = "name"
            self._value = _Value(ch, role)
            self._expect = "comma"
        elif self._expect == "comma" and ch == ",":
            self._expect = "key"
        elif self._expect in ("key", "comma") and ch == "}":
            self._end_call(out)
        else:
            raise NotJson(f"unexpected {ch!r} in a tool call")

    def _value_done(self, out: list[CallPiece]) -> None:
        value, self._value = self._value, None
        assert value is not None
        if value.role == "key":
            self._key, self._expect = value.text(), "colon"
        elif value.role == "name":
            name = value.text()
            if not isinstance(name, str) or not name:
                raise NotJson(f"a tool call's name must be a non-empty string, not {value.raw}")
            self._name = name
            self._start(out)
        elif value.role == "args":
            if value.kind == "string":  # arguments sent as a JSON string holding the JSON
                self._arguments(value.text(), out)
            else:
                self._arguments(value.raw[self._emitted :], out)

    def _stream_arguments(self, out: list[CallPiece]) -> None:
        value = self._value
        if value is not None and value.role == "args" and value.kind != "string" and len(value.raw) > self._emitted:
            self._arguments(value.raw[self._emitted :], out)
            self._emitted = len(value.raw)

    def _arguments(self, text: str, out: list[CallPiece]) -> None:
        if not text:
            return
        if self._started:
            out.append(CallArguments(text))
        else:
            self._held.append(text)

    def _start(self, out: list[CallPiece]) -> None:
        if self._started or self._name is None:
            return
        self._started = True
        out.append(CallStart(self._name))
        if self._held:
            out.append(CallArguments("".join(self._held)))
            self._held = []

    def _end_call(self, out: list[CallPiece]) -> None:
        if self._name is None:
            raise NotJson("a tool call without a name")
        self._depth -= 1
        if not self._args_seen:
            out.append(CallArguments("{}"))
        out.append(CallEnd())
        if not self._array:
            self.done = True

    def finish(self) -> list[CallPiece]:
        """The output ended: a call still open is closed as it stands (its arguments may be cut short)."""
        out: list[CallPiece] = []
        self._stream_arguments(out)
        if self.in_call and self._started:
            if not self._args_seen:
                out.append(CallArguments("{}"))
            out.append(CallEnd())
        return out
