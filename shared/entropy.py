"""Unpredictable bits for ids, without a system call for each.

``secrets.randbits(80)`` asks the kernel (getrandom) on every call, which showed in the intake's profile
once per report. Here 4 KiB of ``os.urandom`` serve ~400 issue ids: the same kernel CSPRNG output, only
fetched in bulk. A forked child starts a fresh pool, so parent and child never hand out the same bytes."""
from __future__ import annotations

import os
import threading

POOL_BYTES = 4096


class EntropyPool:
    def __init__(self, size: int = POOL_BYTES) -> None:
        self._size = size
        self._buf = b""
        self._pos = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._pos + n > len(self._buf):
                self._buf, self._pos = os.urandom(max(self._size, n)), 0
            out = self._buf[self._pos:self._pos + n]
            self._pos += n
            return out

    def randbits(self, k: int) -> int:
        """A uniformly random non-negative int below 2**k (as ``secrets.randbits``)."""
        if k <= 0:
            raise ValueError("number of bits must be greater than zero")
        nbytes = (k + 7) // 8
        return int.from_bytes(self.take(nbytes), "big") >> (nbytes * 8 - k)

    def forget(self) -> None:
        with self._lock:
            self._buf, self._pos = b"", 0


_pool = EntropyPool()
os.register_at_fork(after_in_child=_pool.forget)
randbits = _pool.randbits
