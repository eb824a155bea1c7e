"""Server-sent events, as the streaming routes send them (`data: <json>`, a blank line)."""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp_sse import EventSourceResponse, sse_response

# An event this large or larger takes aiohttp_sse's guarded send (it could fill the socket's buffer).
_MAX_UNGUARDED_BYTES = 16 << 10
# One encoder for every event (json.dumps builds one per call when given options).
_ENCODER = json.JSONEncoder(ensure_ascii=False, check_circular=False)


def event_json(payload: dict) -> str:
    """An event's payload as JSON text, UTF-8 characters kept as they are."""
    return _ENCODER.encode(payload)


class EventStream(EventSourceResponse):
    """aiohttp_sse's response, with a cheaper `send` for the common event.

    aiohttp_sse arms a timer for every event it sends (its send timeout, which cuts off a client that
    stopped reading); at 128 streams that timer was an eighth of the router's time per streamed token.
    Only a write to a client that is behind can wait, so here an event that finds nothing still
    buffered for its client is written at once, and only the others take the guarded send.
    """

    _request: web.BaseRequest | None = None

    async def prepare(self, request: web.BaseRequest):
        self._request = request
        return await super().prepare(request)

    async def send(self, data: str, id: str | None = None, event: str | None = None, retry: int | None = None) -> None:
        transport = self._request.transport if self._request is not None else None
        if (id is None and event is None and retry is None and transport is not None and not transport.is_closing()
                and not transport.get_write_buffer_size() and "\n" not in data and "\r" not in data):
            message = f"data: {data}\n\n".encode()
            if len(message) < _MAX_UNGUARDED_BYTES:
                try:
                    await self.write(message)
                except ConnectionResetError:
                    self.stop_streaming()
                    raise
                return
        await super().send(data, id=id, event=event, retry=retry)


def open_event_stream(request: web.Request, headers: dict[str, str]):
    """`async with open_event_stream(...) as stream`: the prepared response; `await stream.send(json)`."""
    return sse_response(request, headers=headers, sep="\n", allow_all_methods=True, response_cls=EventStream)
