"""The event loop every long-running needle process runs on.

uvloop (libuv, in C; it comes with ``uvicorn[standard]``) when it is installed, the standard asyncio loop
otherwise or when ``NEEDLE_EVENT_LOOP=asyncio``. The HTTP intake spends much of a report on socket reads
and writes and on scheduling callbacks, and uvloop does both in C: it is the loop uvicorn itself picks by
default (``loop="auto"``), so it is also the loop the intake benchmark's bare FastAPI baseline runs on."""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
EventLoopChoice = Literal["auto", "uvloop", "asyncio"]


def loop_factory(choice: EventLoopChoice = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory for ``asyncio.Runner``; None means the standard loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # uvloop is not built for Windows
        if choice == "uvloop":
            raise RuntimeError("NEEDLE_EVENT_LOOP=uvloop but uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: EventLoopChoice = "auto") -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)

