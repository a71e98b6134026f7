"""The tokenizer's own `response_template`, parsed by transformers' streaming ResponseParser.

Used when a model ships one: it is the model authors' own description of their output. Answer
and reasoning text stream as they arrive; a tool call is reported whole when its region closes
(the template's parsers read a call's JSON only once it is complete).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from neuron.engine.parsing.output import Call, Content, Parsed, Thought

log = logging.getLogger(__name__)

_REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


class TemplateParser:
    def __init__(
        self,
        tokenizer: Any,
        prompt_text: str,
        tools: list[dict[str, Any]] | None,
        call_id: Callable[[], str],
        max_calls: int | None = None,
    ) -> None:
        self._parser = tokenizer.get_response_parser(prefix=prompt_text, tools=tools)
        self._call_id = call_id
        self._max_calls = max_calls
        self._broken = False
        self.calls = 0
        self.ended = False

    def push(self, text: str) -> list[Parsed]:
        if self._broken:
            return [Content(text)] if text else []
        return self._guarded(lambda: self._parser.feed(text), text)

    def finish(self) -> list[Parsed]:
        if self._broken:
            return []
        return self._guarded(lambda: self._parser.finalize()[1], "")

    def _guarded(self, step: Callable[[], list[dict[str, Any]]], text: str) -> list[Parsed]:
        try:
            return self._translate(step())
        except Exception as exc:  # a template's parser refusing odd output must not end the job
            log.warning("response_template parsing failed, passing the rest through as text: %s", exc)
            self._broken = True
            return [Content(text)] if text else []

    def _translate(self, events: list[dict[str, Any]]) -> list[Parsed]:
        out: list[Parsed] = []
        for event in events:
            field = event.get("field")
            if event["type"] == "region_chunk" and not event.get("dirty") and event.get("text"):
                if field in _REASONING_FIELDS:
                    out.append(Thought(event["text"]))
                elif field == "content":
                    out.append(Content(event["text"]))
            elif event["type"] == "region_close" and field == "tool_calls":
                values = event["value"] if isinstance(event["value"], list) else [event["value"]]
                out.extend(self._call(v) for v in values if not self.ended)
        return out

    def _call(self, value: Any) -> Call:
        function = value.get("function", value) if isinstance(value, dict) else {}
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        call = Call(self.calls, self._call_id(), str(function.get("name", "")), arguments)
        self.calls += 1
        self.ended = self._max_calls is not None and self.calls >= self._max_calls
        return call
