"""JetStream stream snapshots and restores through the server's API (nats-py has no helper).

Snapshot (``$JS.API.STREAM.SNAPSHOT.<stream>``): the request names an inbox; the answer carries the
stream's config and state; then the server sends the snapshot (a tar, s2-compressed, of the stream's
files and, unless ``no_consumers``, its consumers) to that inbox in chunks. Each chunk has a reply
subject: answering it is the flow-control ack (the server keeps a window of chunks in flight and waits
for acks beyond it). An empty message ends the snapshot (bare, or with status 204 on recent servers);
another ``Status`` reports a failure.

Restore (``$JS.API.STREAM.RESTORE.<stream>`` with the config and state): the answer names a subject;
each chunk is sent there as a request and acknowledged by the server (an ``-ERR`` answer is a
failure); an empty request ends the upload and is answered, once the server has rebuilt the stream,
with a stream-create response (the stream's info, or an error). The server refuses a stream that
exists (err_code 10130) and gives up on an upload idle for ~5 s."""
from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson
from nats.aio.client import Client as NATS

CHUNK = 128 * 1024
STREAM_EXISTS_RESTORE = 10130
EOF_STATUS = "204"  # nats-server 2.15 ends a snapshot with an empty "204" message (older ones: a bare one)
Progress = Callable[[int], None]  # bytes just transferred


class SnapshotError(RuntimeError):
    pass


@dataclass(frozen=True)
class Snapshot:
    stream: str
    config: dict[str, Any]
    state: dict[str, Any]
    bytes: int
    sha256: str


async def _api(nc: NATS, subject: str, body: dict[str, Any] | None, timeout: float = 10.0) -> dict[str, Any]:
    msg = await nc.request(subject, orjson.dumps(body) if body is not None else b"", timeout=timeout)
    resp: dict[str, Any] = orjson.loads(msg.data)
    err = resp.get("error")
    if err:
        raise SnapshotError(f"{subject}: {err.get('description')} (err_code {err.get('err_code')})")
    return resp


async def stream_names(nc: NATS) -> list[str]:
    names: list[str] = []
    offset = 0
    while True:
        resp = await _api(nc, "$JS.API.STREAM.NAMES", {"offset": offset})
        page = resp.get("streams") or []
        names += page
        offset += len(page)
        if not page or offset >= int(resp.get("total", 0)):
            return sorted(names)


async def stream_info(nc: NATS, stream: str) -> dict[str, Any] | None:
    msg = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=10)
    resp: dict[str, Any] = orjson.loads(msg.data)
    if resp.get("error"):
        if resp["error"].get("err_code") == 10059:  # stream not found
            return None
        raise SnapshotError(f"stream info {stream}: {resp['error'].get('description')}")
    return resp


async def delete_stream(nc: NATS, stream: str) -> None:
    await _api(nc, f"$JS.API.STREAM.DELETE.{stream}", None)


async def snapshot(nc: NATS, stream: str, out: BinaryIO, *, consumers: bool = True, chunk_size: int = CHUNK,
                   progress: Progress | None = None, idle_timeout: float = 30.0) -> Snapshot:
    """Write a snapshot of ``stream`` to ``out``; returns its config, state, size and sha256."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)  # interest first: the server waits briefly for it, then streams
    await nc.flush()
    digest = hashlib.sha256()
    size = 0
    try:
        resp = await _api(nc, f"$JS.API.STREAM.SNAPSHOT.{stream}",
                          {"deliver_subject": inbox, "no_consumers": not consumers, "chunk_size": chunk_size})
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except Exception as exc:
                raise SnapshotError(f"snapshot of {stream} stalled after {size} bytes") from exc
            status = (msg.headers or {}).get("Status")
            if status and status != EOF_STATUS:
                desc = (msg.headers or {}).get("Description", "")
                raise SnapshotError(f"snapshot of {stream} failed: {status} {desc}")
            if not msg.data:  # end of the snapshot: an empty message, bare or with status 204
                break
            out.write(msg.data)
            digest.update(msg.data)
            size += len(msg.data)
            if msg.reply:  # flow control: acknowledge the chunk
                await nc.publish(msg.reply, b"")
            if progress:
                progress(len(msg.data))
    finally:
        await sub.unsubscribe()
    return Snapshot(stream, resp["config"], resp["state"], size, digest.hexdigest())


async def restore(nc: NATS, config: dict[str, Any], state: dict[str, Any], src: BinaryIO, *,
                  chunk_size: int = CHUNK, progress: Progress | None = None,
                  finish_timeout: float = 600.0) -> dict[str, Any]:
    """Upload a snapshot read from ``src`` as the stream of ``config`` (which must not exist).
    Returns the restored stream's info."""
    stream = config["name"]
    resp = await _api(nc, f"$JS.API.STREAM.RESTORE.{stream}", {"config": config, "state": state})
    deliver = resp["deliver_subject"]
    while True:
        chunk = await asyncio.to_thread(src.read, chunk_size)
        if not chunk:
            break
        ack = await nc.request(deliver, chunk, timeout=30)
        if ack.data.startswith(b"-ERR"):
            raise SnapshotError(f"restore of {stream} refused a chunk: {ack.data.decode(errors='replace')}")
        if progress:
            progress(len(chunk))
    done = await nc.request(deliver, b"", timeout=finish_timeout)
    info: dict[str, Any] = orjson.loads(done.data)
    if info.get("error"):
        raise SnapshotError(f"restore of {stream} failed: {info['error'].get('description')} "
                            f"(err_code {info['error'].get('err_code')})")
    return info
