"""The chat playground at GET /: one HTML page shipped in the package (static/playground.html, no CDN
or other asset) that streams from the server's own /v1/chat/completions.

POST / stays TGI's generate. GET / used to answer the health check, so the page comes with the health
check's status: 200 while the shards answer, 503 (and the page still) when they do not, and load
balancers probing / keep working.
"""

from __future__ import annotations

import json
from importlib import resources

from aiohttp import web

from tgi_router.app import get_router
from tgi_router.errors import UnhealthyError

_PAGE = resources.files("tgi_router").joinpath("static/playground.html").read_text(encoding="utf-8")
_CONFIG_START, _CONFIG_END = "/*TGI_CONFIG*/", "/*END*/"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", playground)


def page(api_key_required: bool) -> str:
    """The page with what it must know before its first request (JSON between the config markers)."""
    start, end = _PAGE.index(_CONFIG_START) + len(_CONFIG_START), _PAGE.index(_CONFIG_END)
    return _PAGE[:start] + json.dumps({"api_key_required": api_key_required}) + _PAGE[end:]


async def playground(request: web.Request) -> web.Response:
    router = get_router(request)
    status = 200
    try:
        await router.engine.shards.health()
    except Exception:  # any shard failure: the health check's 503, the page still shown
        status = UnhealthyError.status
    return web.Response(text=page(router.api_key is not None), content_type="text/html", status=status,
                        headers={"Cache-Control": "no-cache"})
