"""Token revocations in the JetStream KV bucket ``NEEDLE_REVOKED``: written by ``needle token revoke``,
followed (KV watch) by every process that verifies tokens, so a revocation reaches all of them within
about a second and survives restarts (file storage, no expiry)."""
from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.aio.client import Client as NATS
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from shared.revocation import Revocations, jti_key, jti_value, subject_key, subject_value

BUCKET = "NEEDLE_REVOKED"
READY_TIMEOUT_S = 10.0
log = structlog.get_logger("needle.revocations")


async def open_bucket(nc: NATS, replicas: int = 1) -> KeyValue:
    js = nc.jetstream()
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(config=KeyValueConfig(
            bucket=BUCKET, history=1, storage=StorageType.FILE, replicas=replicas,
            description="revoked needle tokens: jti.<jti> and sub.<base64url subject>"))


async def revoke_token(kv: KeyValue, jti: str, *, at: float, by: str) -> int:
    """Refuse the token ``jti`` from now on; the bucket revision."""
    return int(await kv.put(jti_key(jti), jti_value(at=at, by=by)))


async def revoke_subject(kv: KeyValue, subject: str, *, before: float, by: str) -> int:
    """Refuse every token of ``subject`` issued at or before ``before`` (unix seconds)."""
    return int(await kv.put(subject_key(subject), subject_value(before=before, by=by)))


class RevocationFollower:
    """Keeps a :class:`Revocations` up to date from the bucket. ``start`` returns once everything already
    in the bucket is applied (a restarted process never accepts a token revoked before it started); the
    watch (an ordered consumer, which resets itself across reconnects) then applies each new entry."""

    def __init__(self, kv: KeyValue, revocations: Revocations, health: dict[str, bool] | None = None,
                 retry_s: float = 1.0) -> None:
        self.kv, self.revocations = kv, revocations
        self._watcher: KeyValue.KeyWatcher | None = None
        self._caught_up = asyncio.Event()
        self._target = 0
        # ``revocations`` in /healthz: False while the watch is down (tokens revoked meanwhile are not seen yet)
        self.health = health if health is not None else {}
        self.retry_s = retry_s

    async def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        status = await self.kv.status()
        self._target = int(status.stream_info.state.last_seq)
        if self._target == 0:
            self._caught_up.set()
        self._watcher = await self.kv.watchall()
        self._task = asyncio.create_task(self._follow(), name="revocations")
        try:
            await asyncio.wait_for(self._caught_up.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"could not read the revoked tokens in {BUCKET} within {timeout} s") from None
        self.health["revocations"] = True

    async def _follow(self) -> None:
        """Follow the watch; when it ends or fails, flag ``revocations`` down in the health map, log it, and
        watch again (from the start: applying an entry twice changes nothing) after a growing pause."""
        self._pause = self.retry_s
        while True:
            try:
                await self._watch()
                why = "the watch ended"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = repr(exc)
            self.health["revocations"] = False
            log.error("token revocation watch down; revoked tokens may be accepted until it is back", error=why)
            while True:
                await asyncio.sleep(self._pause)
                self._pause = min(self._pause * 2, 30.0)
                try:
                    self._watcher = await self.kv.watchall()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("token revocation watch could not restart", error=repr(exc))

    async def _watch(self) -> None:
        assert self._watcher is not None
        async for entry in self._watcher:
            if entry is None:  # the end of the initial values: every revocation written so far is applied
                if self._caught_up.is_set() and not self.health.get("revocations", False):
                    self.health["revocations"] = True
                    self._pause = self.retry_s
                    log.info("token revocation watch back")
                continue
            value = None if entry.operation in (KV_DEL, KV_PURGE) else entry.value
            self.revocations.apply(entry.key, value, int(entry.revision or 0))
            if self.revocations.seq >= self._target:
                self._caught_up.set()
            if value:
                log.info("token revocation applied", key=entry.key, revision=entry.revision)

    async def stop(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
