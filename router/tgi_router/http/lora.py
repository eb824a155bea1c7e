"""vLLM's run-time LoRA routes: `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`.

Both take vLLM's bodies (`{"lora_name", "lora_path"}`, `{"lora_name"}`) and answer its plain-text
success line; errors are TGI's JSON. Like every POST route they need the API key when one is set.
Loading reads the adapter on every shard (a local PEFT directory, or a Hub id, `id@revision`) and
checks it against the model before its name is served; unloading takes the name away at once and
waits for the requests already using the adapter before the shards forget it.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from tgi_router.app import add_post, get_router, read_json
from tgi_router.errors import InferError, ValidationError
from tgi_router.shard_client import ShardError


def add_routes(app: web.Application) -> None:
    add_post(app, "/v1/load_lora_adapter", load_lora_adapter)
    add_post(app, "/v1/unload_lora_adapter", unload_lora_adapter)


def _error(message: str, status: int = 400) -> InferError:
    return InferError(message, status, "lora_adapter")


def _name(body: dict) -> str:
    name = body.get("lora_name")
    if not isinstance(name, str) or not name.strip():
        raise ValidationError("`lora_name` must be a non-empty string")
    return name


async def load_lora_adapter(request: web.Request) -> web.Response:
    router = get_router(request)
    body = await read_json(request)
    name, path = _name(body), body.get("lora_path")
    if not isinstance(path, str) or not path.strip():
        raise ValidationError("`lora_path` must be a non-empty string: a PEFT adapter directory or a Hub id")
    adapters = router.validation.lora
    if not adapters.num_slots:
        raise _error("LoRA is off: start the server with --max-loras N (or --lora-adapters) to load adapters")
    if name in adapters.ids or name in (router.info["model_id"], "tgi"):
        raise _error(f"The LoRA adapter `{name}` has already been loaded" if name in adapters.ids
                     else f"`{name}` names the base model")
    adapter_id = adapters.new_id()
    try:
        rank = await router.engine.shards.load_adapter(adapter_id, name, path)
    except ShardError as error:
        raise _error(f"cannot load LoRA adapter `{name}`: {error}") from None
    if name in adapters.ids:  # loaded meanwhile by another request
        await router.engine.shards.unload_adapter(adapter_id)
        raise _error(f"The LoRA adapter `{name}` has already been loaded")
    adapters.add(name, adapter_id)
    return web.Response(text=f"Success: LoRA adapter '{name}' (rank {rank}) added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    router = get_router(request)
    name = _name(await read_json(request))
    try:
        adapter_id = router.validation.lora.remove(name)
    except KeyError:
        raise _error(f"The LoRA adapter `{name}` is not loaded", 404) from None
    # Finishes even if the client goes away: the name is gone, the shards must forget the adapter.
    await asyncio.shield(asyncio.ensure_future(_forget(router, adapter_id)))
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


async def _forget(router, adapter_id: int) -> None:
    await router.validation.lora.wait_unused(adapter_id)
    await router.engine.wait_for_sent_steps()  # the last step that may place it in a slot
    await router.engine.shards.unload_adapter(adapter_id)
