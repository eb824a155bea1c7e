"""Tool calling for `/v1/chat/completions`: OpenAI's `tools` and `tool_choice`.

A request's tools go to the chat template as transformers' `apply_chat_template(tools=...)` passes
them; a template that knows nothing of tools gets them in a system message that asks for the Hermes
format instead. The model's tool-call format is the one its template writes (`ToolFormat`):

- Hermes and Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, repeated;
- Llama 3.1 and later: a bare `{"name": ..., "parameters": {...}}` (or after `<|python_tag|>`);
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

`tool_choice: "auto"` lets the model answer freely and `ToolCallParser` recognises calls in its output;
`"required"` and a named function constrain decoding to calls of the given tools with arguments that
follow their parameter schemas (a Lark grammar with the schemas embedded, compiled by llguidance).
The parser runs on the streamed text, token by token, for full responses and streams alike: text
before a call is content; a call's name is reported as soon as it is known and its arguments as they
are generated, as OpenAI's streaming deltas are.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

from tgi_router.errors import ValidationError
from tgi_router.grammar import JSON_DEFAULTS, GrammarSpec

TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes tool calls: `start` opens them (empty: a bare JSON object opens
    them when it is the first thing in the answer), `end` closes each call, `arguments_key` names the
    arguments in each call's JSON object, and `is_list` puts the calls in one JSON array."""

    name: str
    start: str
    end: str
    arguments_key: str
    is_list: bool = False
    separator: str = "\n"  # between parallel calls in the grammar
    bare_json: bool = False


    def write_calls(self, calls: list[dict]) -> str:
        """Calls ({"name", "arguments"} each) as the model would have written them: an assistant
        message's earlier calls, for a template without tools."""
        objects = [json.dumps({"name": call["name"], self.arguments_key: call["arguments"]}, ensure_ascii=False)
                   for call in calls]
        if self.is_list:
            return f"{self.start}[{self.separator.join(objects)}]"
        if self.end:
            return "\n".join(f"{self.start}\n{text}\n{self.end}" for text in objects)
        return self.separator.join(objects)


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments")
LLAMA3_JSON = ToolFormat("llama3_json", "<|python_tag|>", "", "parameters", separator="; ", bare_json=True)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", is_list=True, separator=", ")


def template_format(template: str | None) -> ToolFormat:
    """The format a chat template teaches its model (Hermes for a template without tools)."""
    template = template or ""
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<tool_call>" in template:
        return HERMES
    if "<|python_tag|>" in template or ('"parameters"' in template and "ipython" in template):
        return LLAMA3_JSON
    return HERMES


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", template) is not None


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    spec: dict  # as the request sent it, for the chat template


@dataclass(frozen=True)
class ToolRequest:
    """A chat request's tools and what it asked of them: `choice` is "auto", "required" or a tool's
    name (a request with `tool_choice: "none"` or no tools has no ToolRequest)."""

    tools: tuple[Tool, ...]
    choice: str
    parallel: bool
    format: ToolFormat

    @classmethod
    def parse(cls, body: dict, template: str | None) -> ToolRequest | None:
        """OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`; ValidationError (422) for any
        of them malformed, a duplicate tool name or a choice naming an absent tool."""
        tools, choice = body.get("tools"), body.get("tool_choice")
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise ValidationError(f"`parallel_tool_calls` must be a boolean, got {parallel!r}")
        if tools is None:
            if choice not in (None, "none"):
                raise ValidationError("`tool_choice` is only allowed when `tools` are given")
            return None
        if not isinstance(tools, list) or not tools:
            raise ValidationError("`tools` must be a non-empty list of {type: function, function: {...}} objects")
        parsed = tuple(_tool(spec, index) for index, spec in enumerate(tools))
        names = [tool.name for tool in parsed]
        if len(set(names)) < len(names):
            raise ValidationError("`tools` names a function twice")
        choice = _choice("auto" if choice is None else choice, names)
        return None if choice == "none" else cls(parsed, choice, parallel, template_format(template))

    @property
    def template_tools(self) -> list[dict]:
        return [tool.spec for tool in self.tools]

    def system_prompt(self) -> str:
        """Tells a model whose template has no place for tools what they are and how to call one (in
        the Hermes format, which the parser then reads)."""
        lines = "\n".join(json.dumps(tool.spec, ensure_ascii=False) for tool in self.tools)
        return (
            "You can call functions to answer the user. Their signatures, one JSON object per line:\n"
            f"<tools>\n{lines}\n</tools>\n"
            "To call one, answer with its name and arguments as a JSON object inside <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n</tool_call>\n'
            "If no function fits, answer in plain text."
        )

    def grammar(self, added_token_id) -> GrammarSpec:
        """The calls allowed when the model must call a tool ("required", and "auto" to check the
        tools' schemas) or the named one: a Lark
        grammar in the model's format whose JSON objects follow the tools' parameter schemas.
        `added_token_id(text)` is the id of a marker that the tokenizer holds as one added token (the
        grammar must then name the token), or None."""
        tools = [tool for tool in self.tools if self.choice in ("required", "auto", tool.name)]
        key = self.format.arguments_key
        calls = [
            {"type": "object", "properties": {"name": {"const": tool.name}, key: tool.parameters},
             "required": ["name", key], "additionalProperties": False}
            for tool in tools
        ]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}

        def marker(text: str) -> str:
            if not text:
                return ""
            token_id = added_token_id(text)
            return json.dumps(text) if token_id is None else f"<[{token_id}]>"

        fmt = self.format
        if fmt.is_list:
            array = {"type": "array", "items": schema, "minItems": 1, **({} if self.parallel else {"maxItems": 1})}
            body = f"%json {json.dumps({**array, 'x-guidance': JSON_DEFAULTS})}"
            return GrammarSpec("lark", f"start: {marker(fmt.start)} call\ncall: {body}\n")
        call = f"%json {json.dumps({**schema, 'x-guidance': JSON_DEFAULTS})}"
        if fmt.end:  # Hermes: each call in its own tags
            call = f'{marker(fmt.start)} "\\n" {call} "\\n" {marker(fmt.end)}'
        start = f"call ({json.dumps(fmt.separator)} call)*" if self.parallel else "call"
        return GrammarSpec("lark", f"start: {start}\ncall: {call}\n")



def _tool(spec, index: int) -> Tool:
    function = spec.get("function") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or spec.get("type", "function") != "function" or not isinstance(function, dict):
        raise ValidationError(f"`tools[{index}]` must be {{type: function, function: {{name, description, parameters}}}}")
    name = function.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise ValidationError(f"`tools[{index}].function.name` must be 1-64 letters, digits, _, . or -, got {name!r}")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise ValidationError(f"`tools[{index}].function.description` must be a string")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise ValidationError(f"`tools[{index}].function.parameters` must be a JSON schema object")
    return Tool(name, description, parameters, {"type": "function", "function": function})


def _choice(choice, names: list[str]) -> str:
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise ValidationError(f"`tool_choice` must be one of {', '.join(TOOL_CHOICES)} or a function, got {choice!r}")
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or choice.get("type", "function") != "function":
        raise ValidationError('`tool_choice` must be a string or {"type": "function", "function": {"name": ...}}')
    if name not in names:
        raise ValidationError(f"`tool_choice` names `{name}`, which is not among the tools ({', '.join(names)})")
    return name


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass
class ParsedOutput:
    """What a piece of the model's output adds to the response: `content` text, and OpenAI's
    `tool_calls` deltas (each {"index", and "id", "type", "function": {"name", "arguments"} for a new
    call, or "function": {"arguments": fragment} for more of its arguments})."""

    content: str = ""
    deltas: list[dict] = field(default_factory=list)

    def __iadd__(self, other: ParsedOutput) -> ParsedOutput:
        self.content += other.content
        self.deltas += other.deltas
        return self


_TEXT, _CALLS, _OBJECT = "text", "calls", "object"


class ToolCallParser:
    """Splits a model's output, fed piece by piece, into content and tool calls (`calls`)."""

    def __init__(self, fmt: ToolFormat):
        self.format = fmt
        self.calls: list[ToolCall] = []
        self._state = _TEXT
        self._pending = ""  # text read but not yet decided on
        self._has_content = False  # anything but whitespace went out as content
        self._markers = tuple(m for m in (fmt.start, fmt.end) if m)
        self._header = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"%s"\s*:\s*' % re.escape(fmt.arguments_key))
        self._reset_object()

    def _reset_object(self) -> None:
        self._object = ""
        self._depth = 0
        self._in_string = self._escaped = False
        self._call: ToolCall | None = None  # this object's call once its name went out
        self._streamed = ""  # the arguments sent so far

    def feed(self, text: str) -> ParsedOutput:
        self._pending += text
        out = ParsedOutput()
        while self._pending:
            step = {_TEXT: self._read_text, _CALLS: self._read_between_calls, _OBJECT: self._read_object}[self._state]
            done = step(out)
            if done is False:  # needs more text to decide
                break
        return out

    def finish(self) -> ParsedOutput:
        """The end of the output: undecided text is content; an unfinished call stays as it is."""
        out = ParsedOutput()
        if self._state == _OBJECT and self._call is None:
            self._emit_content(out, self._object)
        if self._state == _TEXT:
            self._emit_content(out, self._pending)
        self._pending = ""
        return out

    def _emit_content(self, out: ParsedOutput, text: str) -> None:
        out.content += text
        self._has_content = self._has_content or bool(text.strip())

    def _read_text(self, out: ParsedOutput) -> bool:
        fmt = self.format
        if fmt.bare_json and not self._has_content and not self.calls:
            stripped = self._pending.lstrip()
            if not stripped:
                return False
            if stripped[0] == "{":
                probe = re.sub(r"\s+", "", stripped)[:8]
                if '{"name"'.startswith(probe[:7]) and len(probe) < 7:
                    return False  # could still be a call
                if probe.startswith('{"name"'):
                    self._pending = stripped
                    self._state = _CALLS
                    return True
        index = self._pending.find(fmt.start)
        if index >= 0:
            self._emit_content(out, self._pending[:index])
            self._pending = self._pending[index + len(fmt.start):]
            self._state = _CALLS
            return True
        keep = _partial_suffix(self._pending, fmt.start)
        self._emit_content(out, self._pending[: len(self._pending) - keep])
        self._pending = self._pending[len(self._pending) - keep:]
        return False

    def _read_between_calls(self, out: ParsedOutput) -> bool:
        text = self._pending.lstrip(" \t\r\n,;[]")
        for marker in self._markers:
            if text.startswith(marker):
                self._pending = text[len(marker):]
                return True
        if not text or any(marker.startswith(text) for marker in self._markers):
            self._pending = text
            return False
        if text[0] == "{":
            self._pending = text
            self._state = _OBJECT
            return True
        self._pending = text  # text after the calls: content again
        self._state = _TEXT
        return True

    def _read_object(self, out: ParsedOutput) -> bool:
        text, self._pending = self._pending, ""
        for position, char in enumerate(text):
            self._object += char
            was_depth = self._depth
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
            if self._call is not None and (self._depth >= 2 or was_depth >= 2):  # inside the arguments
                self._streamed += char
                index = len(self.calls) - 1
                if out.deltas and out.deltas[-1]["index"] == index:  # this feed's delta for the call grows
                    out.deltas[-1]["function"]["arguments"] += char
                else:
                    out.deltas.append({"index": index, "function": {"arguments": char}})
            elif self._call is None and self._depth == 1:
                header = self._header.fullmatch(self._object)
                if header:
                    self._start_call(out, json.loads(f'"{header.group(1)}"'), "")
            if self._depth == 0:
                self._end_object(out)
                self._pending = text[position + 1:]
                self._state = _CALLS
                return True
        return False

    def _start_call(self, out: ParsedOutput, name: str, arguments: str) -> None:
        self._call = ToolCall(new_call_id(), name, arguments)
        self.calls.append(self._call)
        out.deltas.append({"index": len(self.calls) - 1, "id": self._call.id, "type": "function",
                           "function": {"name": name, "arguments": arguments}})

    def _end_object(self, out: ParsedOutput) -> None:
        try:
            value = json.loads(self._object)
        except json.JSONDecodeError:
            value = None
        arguments = value.get(self.format.arguments_key, value.get("arguments")) if isinstance(value, dict) else None
        if self._call is None:
            if isinstance(value, dict) and isinstance(value.get("name"), str):
                self._start_call(out, value["name"], json.dumps(arguments if arguments is not None else {}, ensure_ascii=False))
            else:
                self._emit_content(out, self._object)  # not a call after all
        elif not self._streamed:  # arguments that were not an object or array: sent whole
            self._call.arguments = json.dumps(arguments, ensure_ascii=False)
            out.deltas.append({"index": len(self.calls) - 1, "function": {"arguments": self._call.arguments}})
        else:
            self._call.arguments = self._streamed
        self._reset_object()


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0
