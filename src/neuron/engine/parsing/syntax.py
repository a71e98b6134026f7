"""How a model family writes tool calls and reasoning, and which family a chat template speaks.

Each family is data: the marker that opens tool calls, the marker that closes one (if any),
whether the body is one JSON object or an array of them, and the text that forces a call
when a request requires one (written into the prompt, as if the model had begun it).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def _openai_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def _mistral_id() -> str:
    # Mistral's chat templates refuse any other shape of id in the history.
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


@dataclass(frozen=True)
class ToolSyntax:
    name: str
    opens: tuple[str, ...]  # markers that open tool calls; consumed
    close: str | None  # marker after each call (Hermes), or None: the JSON's end ends it
    array: bool = False  # the body is a JSON array of calls (Mistral)
    separator: str | None = None  # between calls in one body (Llama 3 writes `;`)
    bare_json: bool = False  # an answer that begins with `{"name"` is a call (Llama 3)
    call_id: Callable[[], str] = field(default=_openai_id)
    forced: Callable[[str | None], str] = field(default=lambda name: "")

    def force(self, name: str | None) -> str:
        """The start of the assistant's turn that makes it call `name` (any tool if None)."""
        return self.forced(name)


def _named(prefix: str, name: str | None, args_key: str = "arguments") -> str:
    if name is None:
        return prefix
    return f'{prefix}{{"name": {json.dumps(name)}, "{args_key}": '


HERMES = ToolSyntax(
    "hermes",
    opens=("<tool_call>",),
    close="</tool_call>",
    forced=lambda name: _named("<tool_call>\n", name),
)
LLAMA3 = ToolSyntax(
    "llama3",
    opens=("<|python_tag|>",),
    close=None,
    separator=";",
    bare_json=True,
    forced=lambda name: _named("", name, "parameters") if name else '{"name": "',
)
MISTRAL = ToolSyntax(
    "mistral",
    opens=("[TOOL_CALLS]",),
    close=None,
    array=True,
    call_id=_mistral_id,
    forced=lambda name: "[TOOL_CALLS][" + _named("", name) if name else '[TOOL_CALLS][{"name": "',
)
FAMILIES = {s.name: s for s in (HERMES, LLAMA3, MISTRAL)}


def detect(chat_template: str | None) -> ToolSyntax | None:
    """The family a chat template speaks, read from the markup it renders; None when it names none."""
    text = chat_template or ""
    if "[TOOL_CALLS]" in text:
        return MISTRAL
    if "<tool_call>" in text:
        return HERMES
    if "<|python_tag|>" in text or re.search(r"ipython", text):
        return LLAMA3
    return None


def template_renders_tools(chat_template: str | None) -> bool:
    return chat_template is not None and "tools" in chat_template


def hermes_system_prompt(tools: list[dict[str, Any]]) -> str:
    """Tools described the way Hermes and Qwen models were trained to read them, for chat templates
    that have no place for tools of their own."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )
