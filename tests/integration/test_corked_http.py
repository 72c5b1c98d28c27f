"""uvicorn on the corked protocol, as needle serves HTTP: whole answers, streams that stream, pipelining,
closing after an answer, all over a real socket."""
from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from services.entrypoints.corked import CorkedHttpToolsProtocol, CorkedTransport

release = asyncio.Event()


async def small(request: Request) -> JSONResponse:
    return JSONResponse({"n": int(request.query_params.get("n", "0"))})


async def stream(request: Request) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: first\n\n"
        await release.wait()  # the first chunk must reach the client while the stream is still open
        yield b"data: second\n\n"
    return StreamingResponse(chunks(), media_type="text/event-stream")


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[CorkedHttpToolsProtocol]]]:
    release.clear()
    app = Starlette(routes=[Route("/small", small), Route("/stream", stream)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    made: list[CorkedHttpToolsProtocol] = []

    class Recording(CorkedHttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            made.append(self)

    config = uvicorn.Config(app, http=Recording, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    srv.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(srv.serve(sockets=[sock]))
    while not srv.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
        await asyncio.sleep(0.01)
    yield port, made
    srv.should_exit = True
    await task


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head, await reader.readexactly(length)


async def test_answers_are_whole_and_pipelined_requests_answered_in_order(server) -> None:
    port, made = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(b"GET /small?n=%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(5)))
    bodies = [(await read_answer(reader))[1] for _ in range(5)]
    assert bodies == [b'{"n":%d}' % i for i in range(5)]
    assert isinstance(made[0].transport, CorkedTransport)  # served through the corked transport
    writer.close()


async def test_a_stream_streams_before_it_ends(server) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"text/event-stream" in head
    first = await asyncio.wait_for(reader.readuntil(b"first\n\n"), 5)  # before the stream is released
    assert b"data: first" in first
    release.set()
    rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    assert b"data: second" in rest
    writer.close()


async def test_connection_close_gets_the_whole_answer_then_eof(server) -> None:
    port, _ = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /small?n=7 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)  # read() to EOF: the server closed after writing
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"n":7}')
    writer.close()
