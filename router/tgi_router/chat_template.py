"""Chat templates: the tokenizer's Jinja template rendered in a sandbox, as transformers renders it."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tgi_router.errors import InferError


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
