"""OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Requests are translated into TGI generate parameters (with TGI's mapping: temperature 0 means greedy,
anything else samples; `top_logprobs` becomes `top_n_tokens`) and run through the same validation and
engine as `/generate`. Invalid requests get a 4xx JSON error before any stream starts.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

from aiohttp import web

from tgi_router.app import Router, add_post, get_router, read_json, stream_headers, timing_headers
from tgi_router.chat_answer import AnswerParser, ChatOutput
from tgi_router.chat_template import render_conversation
from tgi_router.engine import RequestStream, TokenEvent
from tgi_router.errors import InferError, ValidationError
from tgi_router.grammar import ANY_JSON_OBJECT
from tgi_router.http.events import event_json, open_event_stream
from tgi_router.http.tgi import collect_all, finite, tokenize_response, with_seed
from tgi_router.reasoning import prompt_opens_reasoning, template_reasons
from tgi_router.request import FinishReason
from tgi_router.tools import ToolRequest
from tgi_router.validation import GenerateRequest, ValidRequest, parse_generate_request, validate_parameters

# Chat reports eos as OpenAI's "stop"; TGI keeps "stop_sequence" for stop sequences.
_CHAT_FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS_TOKEN: "stop", FinishReason.STOP_SEQUENCE: "stop_sequence"}
_RESPONSE_FORMATS = ("text", "json_object", "json_schema", "json", "regex")
# Fields used as they are (the sampling fields go through TGI's parameter checks); null means not given.
_TYPED_FIELDS = {"model": (str, "a string"), "stream_options": (dict, "an object")}
# The chat route's `logprobs` is a switch; the completions route's a count of alternatives (OpenAI's).
_CHAT_FIELDS = {**_TYPED_FIELDS, "logprobs": (bool, "a boolean")}


def add_routes(app: web.Application) -> None:
    add_post(app, "/v1/chat/completions", chat_completions)
    add_post(app, "/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    add_post(app, "/chat_tokenize", chat_tokenize)


async def models(request: web.Request) -> web.Response:
    """The model, then each LoRA adapter (a `model` a request may name)."""
    router = get_router(request)
    model_id = router.info["model_id"]
    data = [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]
    data += [{"id": name, "object": "model", "created": 0, "owned_by": model_id, "parent": model_id}
             for name in router.validation.lora.names]
    return web.json_response({"object": "list", "data": data})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    started_at = time.monotonic()
    router = get_router(request)
    body = await read_json(request)
    is_stream = body.get("stream") is True
    with router.admit():
        generate, output = chat_request(router, body)
        valid = await router.validate(generate, is_stream, add_special_tokens=False)
        tools = output.tools
        if tools is not None and generate.grammar is None and router.grammars is not None:
            # "auto" constrains nothing, but a tool whose parameters are no valid schema is still a 422.
            await router.grammars.prepare_async(tools.grammar(router.tokenizer.added_token_id))
        validated_at = time.monotonic()
        streams = [router.submit(v) for v in _choices(valid, _num_choices(router, body))]
        head = _head(router, body, "chat.completion.chunk" if is_stream else "chat.completion")
        try:
            if not is_stream:
                results = await collect_all(streams)
                headers = timing_headers(router, valid, streams[0], started_at, validated_at)
                choices = [_chat_choice(body, events, output, i) for i, events in enumerate(results)]
                payload = {**head, "choices": choices, "usage": _usage(streams[:1], sum(map(len, results)))}
                return web.json_response(payload, headers=headers)
            async with open_event_stream(request, stream_headers(router, len(valid.inputs))) as sse:
                await _stream_chat(sse, head, body, valid, streams, output)
        finally:
            for stream in streams:  # also when the client left before the response headers went out
                stream.cancel()
        return sse


async def chat_tokenize(request: web.Request) -> web.Response:
    """The chat template's output for a chat request, and its tokens."""
    router = get_router(request)
    chat, _ = chat_request(router, await read_json(request))
    validate_parameters(chat.parameters, router.validation)  # as /v1/chat/completions would
    prompt = chat.inputs
    return await tokenize_response(
        router, prompt, lambda tokens: {"tokenize_response": tokens, "templated_text": prompt}, add_special_tokens=False
    )


async def completions(request: web.Request) -> web.StreamResponse:
    router = get_router(request)
    body = await read_json(request)
    prompts = _prompts(router, body)
    num_choices = _num_choices(router, body, len(prompts))
    is_stream = body.get("stream") is True
    with router.admit():
        valids = [await router.validate(_completion_request(router, body, prompt), is_stream) for prompt in prompts]
        # OpenAI's order: the n choices of the first prompt, then those of the next.
        valids = [choice for valid in valids for choice in _choices(valid, num_choices)]
        streams = [router.submit(valid) for valid in valids]
        head = _head(router, body, "text_completion")
        with_logprobs = _completion_logprobs_count(body) is not None  # checked by _completion_request
        if not is_stream:
            results = await collect_all(streams)
            choices = [
                {"index": i, "text": events[-1].generated_text,
                 "logprobs": _completion_logprobs(events) if with_logprobs else None,
                 "finish_reason": events[-1].finish_reason.value}
                for i, events in enumerate(results)
            ]
            usage = _usage(streams[::num_choices], sum(map(len, results)))
            return web.json_response({**head, "choices": choices, "usage": usage})
        try:
            async with open_event_stream(request, stream_headers(router, sum(len(v.inputs) for v in valids))) as sse:
                await _stream_completions(sse, head, streams, with_logprobs)
        finally:
            for stream in streams:  # also when the client left before the response headers went out
                stream.cancel()
        return sse


def chat_request(router: Router, body: dict) -> tuple[GenerateRequest, ChatOutput]:
    """A chat body as a generate request (the chat template rendered, the OpenAI fields as
    parameters, the tool-call grammar when a call is required), and how to read its answer."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValidationError("`messages` must be a non-empty list of {role, content} objects")
    tokenizer = router.tokenizer
    tools = ToolRequest.parse(body, tokenizer.chat_template)
    if tools is not None and body.get("response_format") not in (None, {"type": "text"}):
        raise ValidationError("`response_format` cannot be combined with `tools` (unless `tool_choice` is none)")
    prompt = render_conversation(tokenizer, [_message(m) for m in messages], tools, _template_kwargs(body))
    _check_types(body, _CHAT_FIELDS)
    parameters = _sampling_parameters(body, router)
    parameters["top_n_tokens"] = body.get("top_logprobs")
    if body.get("presence_penalty") is not None:
        parameters["repetition_penalty"] = _number(body, "presence_penalty") + 2.0  # TGI's mapping
    generate = parse_generate_request({"inputs": prompt, "parameters": parameters})
    if tools is not None and tools.choice != "auto":
        generate = GenerateRequest(generate.inputs, generate.parameters, tools.grammar(tokenizer.added_token_id))
    reasoning = prompt_opens_reasoning(prompt) if template_reasons(tokenizer.chat_template) else None
    return generate, ChatOutput(tools, reasoning)


_TEMPLATE_VARIABLES = ("messages", "tools", "bos_token", "eos_token", "add_generation_prompt")


def _template_kwargs(body: dict) -> dict:
    """`chat_template_kwargs`: more variables for the template, e.g. Qwen3's `enable_thinking`."""
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValidationError(f"`chat_template_kwargs` must be an object, got {kwargs!r}")
    reserved = [name for name in kwargs if name in _TEMPLATE_VARIABLES]
    if reserved:
        raise ValidationError(f"`chat_template_kwargs` cannot set `{reserved[0]}`: the request's own fields do")
    return kwargs


def _completion_request(router: Router, body: dict, prompt: str) -> GenerateRequest:
    if body.get("suffix") is not None:
        raise InferError("Suffix is not supported and can be achieved by preprocessing the prompt.", 422,
                         "suffix not supported")
    _check_types(body, _TYPED_FIELDS)
    parameters = _sampling_parameters(body, router)
    parameters["repetition_penalty"] = body.get("repetition_penalty")
    parameters["top_n_tokens"] = _completion_logprobs_count(body) or None
    return parse_generate_request({"inputs": prompt, "parameters": parameters})


def _completion_logprobs_count(body: dict) -> int | None:
    """OpenAI's completions `logprobs`: how many most likely alternatives to report per token (0: only
    the chosen token's logprob); None: no logprobs."""
    count = body.get("logprobs")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValidationError(f"`logprobs` must be a non-negative integer, got {count!r}")
    return count


def _sampling_parameters(body: dict, router: Router) -> dict:
    """OpenAI fields as TGI generate parameters (types are checked by parse_generate_request); a
    `model` naming a LoRA adapter picks it (any other model name is ignored, as TGI does)."""
    model = body.get("model")
    temperature = body.get("temperature")
    is_greedy = temperature == 0 and not isinstance(temperature, bool)
    stop = body.get("stop")
    return {
        **({"ignore_eos": body["ignore_eos"]} if "ignore_eos" in body else {}),  # vLLM's extension
        "max_new_tokens": body.get("max_tokens", body.get("max_completion_tokens")),
        "do_sample": not is_greedy,
        "temperature": None if is_greedy else temperature,
        "top_p": body.get("top_p"),
        "seed": body.get("seed"),
        "stop": [stop] if isinstance(stop, str) else ([] if stop is None else stop),
        "frequency_penalty": body.get("frequency_penalty"),
        "min_p": body.get("min_p"),  # vLLM's
        "logit_bias": body.get("logit_bias"),
        "grammar": _response_format_grammar(body.get("response_format")),
        "details": True,
        **({"adapter_id": model} if isinstance(model, str) and model in router.validation.lora.ids else {}),
    }


def _num_choices(router: Router, body: dict, num_prompts: int = 1) -> int:
    """OpenAI's `n`: choices per prompt; with the prompts, at most the server's max_client_batch_size."""
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValidationError(f"`n` must be a positive integer, got {n!r}")
    max_batch = router.info["max_client_batch_size"]
    if n * num_prompts > max_batch:
        raise ValidationError(f"`n` ({n}) times the number of prompts ({num_prompts}) must be <= {max_batch}, "
                              "the server's --max-client-batch-size")
    return n


def _choices(valid: ValidRequest, n: int) -> list[ValidRequest]:
    """`n` requests for one prompt, each sampled with its own seed: the given one plus the choice's
    index (reproducible), or a random one. With prefix caching (the default) the prompt is computed
    once: the other choices wait for its KV blocks and start from them."""
    if valid.is_seed_given:
        return [with_seed(valid, (valid.sampling.seed + i) % 2**64) for i in range(n)]
    return [valid] + [with_seed(valid, secrets.randbits(64)) for _ in range(1, n)]


def _response_format_grammar(response_format) -> dict | None:
    """OpenAI's `response_format` (and TGI's {"type": "json" | "regex", "value"}) as TGI's `grammar`
    parameter; None for free text."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in _RESPONSE_FORMATS:
        raise ValidationError(f"`response_format.type` must be one of {', '.join(_RESPONSE_FORMATS)}, got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":  # any JSON object, no schema needed
        return {"type": "json", "value": ANY_JSON_OBJECT}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValidationError("`response_format.json_schema.schema` must be a JSON schema object")
        return {"type": "json", "value": spec["schema"]}
    return response_format  # TGI's own, checked as a grammar


def _check_types(body: dict, fields: dict) -> None:
    """422 for OpenAI fields of the wrong type, which would otherwise be ignored or misread."""
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ValidationError(f"`stream` must be a boolean, got {body['stream']!r}")
    for name, (expected, description) in fields.items():
        value = body.get(name)
        if value is not None and not isinstance(value, expected):
            raise ValidationError(f"`{name}` must be {description}, got {value!r}")
    include_usage = (body.get("stream_options") or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ValidationError(f"`stream_options.include_usage` must be a boolean, got {include_usage!r}")


def _number(body: dict, name: str) -> float:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"`{name}` must be of type number, got {value!r}")
    return float(value)


def _message(message) -> dict:
    """A chat message with its content flattened to text (a string, or a list of text parts)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ValidationError("each message must be an object with a string `role`")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ValidationError("only text content parts ({type: text, text}) are supported")
        content = "".join(part["text"] for part in content)
    if content is not None and not isinstance(content, str):
        raise ValidationError("message `content` must be a string or a list of text parts")
    if message.get("name") is not None and not isinstance(message["name"], str):
        raise ValidationError("message `name` must be a string")
    calls = message.get("tool_calls")
    if calls is not None and not (
        isinstance(calls, list)
        and all(isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
                and isinstance(c["function"].get("arguments", ""), (str, dict)) for c in calls)
    ):
        raise ValidationError("message `tool_calls` must be a list of {id, type, function: {name, arguments}}")
    return {**message, "content": content or ""}


def _prompts(router: Router, body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValidationError("`prompt` must be a string or a non-empty list of strings")
    max_batch = router.info["max_client_batch_size"]
    if len(prompts) > max_batch:
        raise InferError(f"Number of prompts exceeds the maximum of {max_batch}", 422, "batch size exceeded")
    return prompts


def _head(router: Router, body: dict, kind: str) -> dict:
    model = body.get("model")
    return {
        "object": kind,
        "id": "",
        "created": int(time.time()),
        "model": model if isinstance(model, str) and model != "tgi" else router.info["model_id"],
        "system_fingerprint": f"{router.info['version']}-native",
    }


def _chat_choice(body: dict, events: list[TokenEvent], output: ChatOutput, index: int) -> dict:
    last = events[-1]
    message = {"role": "assistant", "content": last.generated_text}
    finish_reason = _CHAT_FINISH[last.finish_reason]
    if output.is_parsed:
        parser = AnswerParser(output)
        if output.tools is None:  # the text as the engine made it (cut at a stop sequence)
            parts = [parser.feed_text(last.generated_text, is_last=True)]
        else:  # token by token: a format's marker may be a special token, which the text leaves out
            parts = [parser.feed(event) for event in events]
        content = "".join(part.get("content", "") for part in parts)
        reasoning = "".join(part.get("reasoning_content", "") for part in parts)
        message = {"role": "assistant", "content": content}
        if reasoning:
            message["reasoning_content"] = reasoning
        if parser.calls:
            message["content"] = content.strip() or None
            message["tool_calls"] = [{"id": call.id, "type": "function",
                                      "function": {"name": call.name, "arguments": call.arguments}}
                                     for call in parser.calls]
            finish_reason = parser.finish_reason(last.finish_reason)
    return {
        "index": index,
        "message": message,
        "logprobs": {"content": [_logprob(e) for e in events]} if body.get("logprobs") else None,
        "finish_reason": finish_reason,
    }


def _logprob(event: TokenEvent) -> dict:
    return {
        "token": event.token.text,
        "logprob": finite(event.token.logprob),
        "top_logprobs": [{"token": t.text, "logprob": finite(t.logprob)} for t in event.top_tokens],
    }


def _usage(prompt_streams: list[RequestStream], completion_tokens: int) -> dict:
    """OpenAI's usage: the prompts' tokens, once per prompt whatever `n` (`prompt_streams`: one choice
    of each prompt), those of them the prefix cache served, and every choice's tokens."""
    prompt_tokens = sum(len(stream.request.prompt_token_ids) for stream in prompt_streams)
    cached_tokens = sum(stream.request.num_cached_prompt_tokens for stream in prompt_streams)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


async def _stream_chat(sse, head: dict, body: dict, valid: ValidRequest, streams: list[RequestStream],
                       output: ChatOutput) -> None:
    """The choices' tokens as they arrive, each chunk naming its choice; a failure ends the stream
    with an error event."""
    num_tokens = [0] * len(streams)
    parsers = [AnswerParser(output) if output.is_parsed else None for _ in streams]
    async for index, event in _interleave(streams):
        if isinstance(event, InferError):
            await sse.send(json.dumps({"error": {"message": event.message, "http_status_code": event.status}}))
            return
        num_tokens[index] += 1
        delta = {"role": "assistant", "content": "" if event.token.special else event.token.text}
        finish_reason = _CHAT_FINISH[event.finish_reason] if event.finish_reason else None
        parser = parsers[index]
        if parser is not None:
            delta.update(parser.feed(event))
            if event.finish_reason:
                finish_reason = parser.finish_reason(event.finish_reason) or finish_reason
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": {"content": [_logprob(event)]} if body.get("logprobs") else None,
            "finish_reason": finish_reason,
        }
        await sse.send(event_json({**head, "choices": [choice], "usage": None}))
    if (body.get("stream_options") or {}).get("include_usage"):
        await sse.send(json.dumps({**head, "choices": [], "usage": _usage(streams[:1], sum(num_tokens))}))
    await sse.send("[DONE]")


async def _interleave(streams: list[RequestStream]):
    """(index, event or InferError) from several streams, as they arrive; every stream is cancelled
    when the caller stops reading. One stream (n = 1, nearly every request) is read directly: a task
    and a queue hop per token cost the router as much as the token's JSON."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        except InferError as error:
            yield 0, error
        finally:
            streams[0].cancel()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream):
        try:
            async for event in stream:
                await queue.put((index, event))
        except InferError as error:
            await queue.put((index, error))
        finally:
            stream.cancel()
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        num_open = len(streams)
        while num_open:
            index, event = await queue.get()
            if event is None:
                num_open -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()


async def _stream_completions(sse, head: dict, streams: list[RequestStream], with_logprobs: bool) -> None:
    """Interleaves the choices' tokens as they arrive; each choice's last chunk has its finish reason."""
    text_offsets = [0] * len(streams)  # characters each choice has generated so far
    async for index, event in _interleave(streams):
        if isinstance(event, InferError):
            await sse.send(json.dumps({"error": {"message": event.message, "http_status_code": event.status}}))
        else:
            chunk = _completion_chunk(index, event, text_offsets if with_logprobs else None)
            await sse.send(event_json({**head, "choices": [chunk]}))
    await sse.send("[DONE]")


def _completion_chunk(index: int, event: TokenEvent, text_offsets: list[int] | None) -> dict:
    """One token of prompt `index`; with `text_offsets` (characters generated so far, per prompt,
    advanced here) its logprobs too."""
    reason = event.finish_reason.value if event.finish_reason else ""
    text = "" if event.token.special else event.token.text
    logprobs = None
    if text_offsets is not None:
        logprobs = _completion_logprobs([event], text_offsets[index])
        text_offsets[index] += len(text)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def _completion_logprobs(events: list[TokenEvent], first_offset: int = 0) -> dict:
    """OpenAI's completions logprobs: each token, its logprob, its alternatives as {text: logprob}
    (empty with `logprobs: 0`), and where it starts in the generated text."""
    offsets, offset = [], first_offset
    for event in events:
        offsets.append(offset)
        offset += 0 if event.token.special else len(event.token.text)
    return {
        "tokens": [event.token.text for event in events],
        "token_logprobs": [finite(event.token.logprob) for event in events],
        "top_logprobs": [{t.text: finite(t.logprob) for t in event.top_tokens} for event in events],
        "text_offset": offsets,
    }
