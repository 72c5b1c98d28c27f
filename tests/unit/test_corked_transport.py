"""The corked transport joins the writes of one event-loop turn into one, and loses or reorders nothing."""
from __future__ import annotations

import asyncio

from services.entrypoints.corked import CorkedTransport


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.eof = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 7

    def pause_reading(self) -> None:
        self.paused = True


def corked() -> tuple[CorkedTransport, FakeTransport]:
    raw = FakeTransport()
    return CorkedTransport(raw, asyncio.get_running_loop()), raw  # type: ignore[arg-type]


async def turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_turn_leave_in_one_write() -> None:
    t, raw = corked()
    t.write(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n")
    t.write(memoryview(b"{}"))
    assert raw.writes == []  # held until the end of the turn
    assert t.get_write_buffer_size() == 7 + 45
    await turn()
    assert raw.writes == [b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}"]


async def test_writes_of_later_turns_leave_in_later_writes_in_order() -> None:
    t, raw = corked()
    t.write(b"head")
    await turn()
    t.writelines([b"chunk-1", b"chunk-2"])
    await turn()
    t.write(b"chunk-3")
    await turn()
    assert raw.writes == [b"head", b"chunk-1chunk-2", b"chunk-3"]


async def test_close_and_eof_send_what_was_written_first() -> None:
    t, raw = corked()
    t.write(b"answer")
    t.close()
    assert raw.writes == [b"answer"] and raw.closed
    await turn()  # the scheduled flush finds nothing left and writes nothing after close
    assert raw.writes == [b"answer"]
    t2, raw2 = corked()
    t2.write(b"last")
    t2.write_eof()
    assert raw2.writes == [b"last"] and raw2.eof


async def test_abort_drops_what_was_held_and_a_closed_transport_is_not_written() -> None:
    t, raw = corked()
    t.write(b"never")
    t.abort()
    await turn()
    assert raw.writes == [] and raw.aborted
    t2, raw2 = corked()
    t2.write(b"late")
    raw2.closed = True  # the peer went away in the meantime
    await turn()
    assert raw2.writes == []


async def test_everything_else_is_the_transports() -> None:
    t, raw = corked()
    t.pause_reading()
    assert raw.paused
    assert t.is_closing() is False

