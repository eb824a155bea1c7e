"""Chat templates: the tokenizer's Jinja template rendered in a sandbox, as transformers renders it."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tgi_router.errors import InferError, ValidationError
from tgi_router.tokenizer import Tokenizer
from tgi_router.tools import ToolRequest, template_format, template_knows_tools


class TemplateError(InferError):
    status = 422
    error_type = "template_error"

    def __init__(self, detail: str):
        super().__init__(f"Template error: {detail}")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(
    template: str | None,
    messages: list[dict],
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    variables: dict | None = None,
) -> str:
    """The prompt for `messages`; TemplateError (422) when the model has no template or it fails."""
    if template is None:
        raise TemplateError("this model has no chat template; use /generate with a prompt instead")
    try:
        return _compile(template).render(
            messages=messages,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            **(variables or {}),
        )
    except jinja2.exceptions.TemplateError as error:
        raise TemplateError(str(error)) from error


def render_conversation(tokenizer: Tokenizer, messages: list[dict], tools: ToolRequest | None, variables: dict) -> str:
    """The tokenizer's template applied to `messages`, `tools` and more `variables`. A template that
    knows tools gets them, and earlier calls' arguments as objects (as transformers' templates
    expect); for one that does not, the tools go into the system message and earlier calls and their
    results into the text."""
    template = tokenizer.chat_template
    if template_knows_tools(template):
        return render_chat(template, [_with_argument_objects(m) for m in messages], tokenizer.bos_token,
                           tokenizer.eos_token, tools=tools.template_tools if tools else None, variables=variables)
    fmt = tools.format if tools else template_format(template)
    converted: list[dict] = []
    follows_a_result = False  # consecutive tool results share one user message
    for message in messages:
        if message["role"] == "tool":
            result = f"<tool_response>\n{message['content']}\n</tool_response>"
            if follows_a_result:
                converted[-1]["content"] += "\n" + result
            else:
                converted.append({"role": "user", "content": result})
            follows_a_result = True
            continue
        follows_a_result = False
        if message.get("tool_calls"):
            text = fmt.write_calls([call["function"] for call in _with_argument_objects(message)["tool_calls"]])
            message = {"role": message["role"], "content": "\n".join(t for t in (message["content"], text) if t)}
        converted.append(message)
    if tools is not None:
        if converted[0]["role"] == "system":
            converted[0] = {**converted[0], "content": converted[0]["content"] + "\n\n" + tools.system_prompt()}
        else:
            converted.insert(0, {"role": "system", "content": tools.system_prompt()})
    return render_chat(template, converted, tokenizer.bos_token, tokenizer.eos_token, variables=variables)


def _with_argument_objects(message: dict) -> dict:
    """An assistant message whose tool calls' `arguments` (JSON text in OpenAI's API) are objects."""
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        arguments = call["function"]["arguments"]
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise ValidationError(f"tool call `{call['function']['name']}` has arguments that are not JSON") from None
        calls.append({**call, "function": {**call["function"], "arguments": arguments}})
    return {**message, "tool_calls": calls}
