"""Cloud platform routes: SageMaker's `/invocations` and Vertex AI's `/vertex`."""

from __future__ import annotations

from aiohttp import web

from tgi_router.app import add_post, get_router, read_json
from tgi_router.errors import ValidationError
from tgi_router.http import openai, tgi
from tgi_router.validation import (
    GenerateParameters,
    GenerateRequest,
    parse_generate_request,
    validate_parameters,
)


def add_routes(app: web.Application) -> None:
    add_post(app, "/invocations", invocations)
    add_post(app, "/vertex", vertex)


async def invocations(request: web.Request) -> web.StreamResponse:
    """SageMaker: a generate request (`inputs`), a chat request (`messages`) or a completion (`prompt`)."""
    body = await read_json(request)
    if "inputs" in body:
        return await tgi.compat_generate(request)
    if "messages" in body:
        return await openai.chat_completions(request)
    if "prompt" in body:
        return await openai.completions(request)
    raise ValidationError("expected a generate (`inputs`), chat (`messages`) or completion (`prompt`) request")


async def vertex(request: web.Request) -> web.Response:
    """Vertex AI: `{"instances": [...]}` -> `{"predictions": [text, ...]}`. An instance is a generate
    request (`inputs`, `parameters`?) or a chat request (`messages`, and the chat route's fields).

    As in TGI, a generate instance samples, and only `max_new_tokens` and `seed` are taken from its
    parameters. A failed generation is answered as on every other route (TGI answers a 500 here).
    """
    router = get_router(request)
    instances = (await read_json(request)).get("instances")
    if not isinstance(instances, list) or not instances:
        raise ValidationError("`instances` must be a non-empty list")
    requests = [_instance_request(router, instance) for instance in instances]
    with router.admit():
        valids = [await router.validate(r, add_special_tokens="messages" not in i) for r, i in zip(requests, instances)]
        results = await tgi.collect_all([router.submit(v) for v in valids])
    return web.json_response({"predictions": [events[-1].generated_text for events in results]})


def _instance_request(router, instance) -> GenerateRequest:
    """The instance as a request; every parameter is checked, though a generate instance uses two."""
    if not isinstance(instance, dict):
        raise ValidationError("each instance must be an object with `inputs` or `messages`")
    if "messages" in instance:
        chat, _ = openai.chat_request(router, instance)  # predictions are text: tool calls stay in it
        validate_parameters(chat.parameters, router.validation)
        return chat
    parameters = instance.get("parameters")
    parsed = parse_generate_request({"inputs": instance.get("inputs"), "parameters": {} if parameters is None else parameters})
    validate_parameters(parsed.parameters, router.validation)
    kept = GenerateParameters(do_sample=True, max_new_tokens=parsed.parameters.max_new_tokens, seed=parsed.parameters.seed)
    return GenerateRequest(parsed.inputs, kept)
