"""A small keep-alive HTTP/1.1 transport for the shared ``httpx.AsyncClient`` of webhook delivery.

httpcore's connection pool costs O(connections) per request and a failed ``import sniffio`` per lock
(sniffio is not installed here): with 64 requests in flight it managed ~400 requests/s against a local
receiver, this transport ~4,000/s. It keeps httpx's API (timeouts, headers, ``httpx.*`` errors) and
does only what webhooks need: one request and its bounded response per connection at a time, idle
connections reused per origin (LIFO), dropped after ``keepalive_s`` or when the peer closed them; a
request that fails on a reused connection before any response byte is sent once more on a fresh one.
No proxies, no HTTP/2, no redirects (a 3xx is a failed delivery).

With ``allow`` (an AllowList, targets.py) every new connection resolves its host once, refuses it unless
each address is public or allowed, and connects to the checked address (TLS still verifies the host name).
"""
from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field

import httpx

from .targets import AllowList, TargetRefused, resolve_checked

Origin = tuple[str, str, int]
HEAD_LIMIT = 64 * 1024


class _Stale(Exception):
    """A reused connection failed before the response started: safe to try once on a new one."""


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = field(default_factory=time.monotonic)

    def usable(self, now: float, keepalive_s: float) -> bool:
        return (now - self.idle_since < keepalive_s and not self.writer.is_closing()
                and not self.reader.at_eof())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def _default_ssl() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover
        return ssl.create_default_context()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_per_origin: int = 256, keepalive_s: float = 4.0, max_response_bytes: int = 64 * 1024,
                 ssl_context: ssl.SSLContext | None = None, allow: AllowList | None = AllowList()) -> None:
        self.max_per_origin, self.keepalive_s, self.max_response_bytes = max_per_origin, keepalive_s, max_response_bytes
        self.allow = allow  # public targets only by default; None checks nothing (never in needle itself)
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Conn]] = {}
        self._slots: dict[Origin, asyncio.Semaphore] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        tls = url.scheme == "https"
        origin: Origin = (url.scheme, url.host, url.port or (443 if tls else 80))
        t = request.extensions.get("timeout", {})
        total = t.get("read") or t.get("connect") or 10.0
        slots = self._slots.get(origin) or self._slots.setdefault(origin, asyncio.Semaphore(self.max_per_origin))
        try:
            async with asyncio.timeout(t.get("pool") or total):
                await slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection in time", request=request) from None
        try:
            body = await request.aread()
            head = b"".join([b"%s %s HTTP/1.1\r\n" % (request.method.encode(), url.raw_path),
                             *(k + b": " + v + b"\r\n" for k, v in request.headers.raw), b"\r\n"])
            deadline = asyncio.get_running_loop().time() + total
            for attempt in (0, 1):
                conn, reused = await self._checkout(origin, tls, deadline, t.get("connect"), request)
                try:
                    async with asyncio.timeout_at(deadline):
                        status, headers, content, keep = await self._exchange(conn, head + body, request, reused)
                except _Stale:
                    conn.close()
                    if attempt == 0:
                        continue
                    raise httpx.RemoteProtocolError("server closed the connection", request=request) from None
                except TimeoutError:
                    conn.close()
                    raise httpx.ReadTimeout("no complete response in time", request=request) from None
                except BaseException:
                    conn.close()
                    raise
                if keep:
                    conn.idle_since = time.monotonic()
                    self._idle.setdefault(origin, []).append(conn)
                else:
                    conn.close()
                return httpx.Response(status, headers=headers, content=content,
                                      extensions={"http_version": b"HTTP/1.1"}, request=request)
            raise AssertionError("unreachable")
        finally:
            slots.release()

    async def _checkout(self, origin: Origin, tls: bool, deadline: float, connect_s: float | None,
                        request: httpx.Request) -> tuple[_Conn, bool]:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.usable(now, self.keepalive_s):
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        budget = deadline - loop.time() if connect_s is None else min(connect_s, deadline - loop.time())
        try:
            async with asyncio.timeout(max(budget, 0.001)):
                host = origin[1]
                if self.allow is not None:  # resolve once, check, connect to the address that was checked
                    host = str((await resolve_checked(origin[1], origin[2], self.allow))[0])
                if tls:
                    self._ssl = self._ssl or _default_ssl()
                    r, w = await asyncio.open_connection(host, origin[2], ssl=self._ssl, server_hostname=origin[1],
                                                         limit=HEAD_LIMIT)
                else:
                    r, w = await asyncio.open_connection(host, origin[2], limit=HEAD_LIMIT)
        except TargetRefused as exc:
            raise httpx.ConnectError(f"target refused: {exc}", request=request) from None
        except TimeoutError:
            raise httpx.ConnectTimeout("connect timed out", request=request) from None
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=request) from exc
        return _Conn(r, w), False

    async def _exchange(self, conn: _Conn, data: bytes, request: httpx.Request, reused: bool
                        ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        r = conn.reader
        started = False
        try:
            conn.writer.write(data)
            await conn.writer.drain()
            while True:  # skip interim 1xx answers
                raw = await r.readuntil(b"\r\n\r\n")
                started = True
                lines = raw[:-4].split(b"\r\n")
                parts = lines[0].split(b" ", 2)
                if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                    raise httpx.RemoteProtocolError(f"bad status line {lines[0][:80]!r}", request=request)
                status = int(parts[1])
                if not (100 <= status < 200):
                    break
            headers: list[tuple[bytes, bytes]] = []
            for line in lines[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    raise httpx.RemoteProtocolError("malformed response header", request=request)
                headers.append((name.strip(), value.strip()))
            keep = parts[0] == b"HTTP/1.1"
            length: int | None = None
            chunked = False
            for name, value in headers:
                low = name.lower()
                if low == b"content-length":
                    length = int(value)
                elif low == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif low == b"connection" and b"close" in value.lower():
                    keep = False
            content, complete = await self._body(r, status, request.method, chunked, length)
            return status, headers, content, keep and complete
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if reused and not started and not (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise _Stale() from exc
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise httpx.RemoteProtocolError(f"malformed response: {exc}", request=request) from exc
        except OSError as exc:
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc

    async def _body(self, r: asyncio.StreamReader, status: int, method: str, chunked: bool, length: int | None
                    ) -> tuple[bytes, bool]:
        """The response body, at most ``max_response_bytes``; ``complete`` is False when the rest was left
        unread (the connection is then closed, not reused)."""
        cap = self.max_response_bytes
        if method == "HEAD" or status in (204, 304):
            return b"", True
        if chunked:
            out = bytearray()
            while True:
                size = int((await r.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers
                        pass
                    return bytes(out), True
                if len(out) + size > cap:
                    return bytes(out), False
                out += await r.readexactly(size)
                await r.readexactly(2)
        if length is not None:
            if length > cap:
                return b"", False
            return await r.readexactly(length), True
        return await r.read(cap), False  # delimited by close

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()
