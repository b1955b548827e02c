"""Every key this replica knows, in memory, kept in step with the database by polling its change log.

Authentication never touches the database: a request's key is looked up here in microseconds. Key
writes go to the database first, then here; other replicas see them on their next poll
(`auth.key_sync_interval`, 0.5 s by default), so a revoked key stops everywhere within a second. A
database that cannot be reached keeps the last known keys in force and is retried.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..config.access import AuthConfig, KeySettings
from ..errors import Conflict, DatabaseUnavailable, NotFound
from ..storage.database import Database, StorageError
from ..storage.keystore import KeyStore, StoredKey
from .keys import MASTER, ApiKey, Principal, digest_of, hash_key, key_id_of, matches_hash, new_key

log = logging.getLogger("synapse.keys")
# Keys already verified, each with the key object it matched: a client sends the same key on every
# request, so its SHA-256 is computed once, not per request. Bounded; only correct keys enter.
_VERIFIED_MAX = 10000
Connect = Callable[[], Awaitable[Database]]


class Keyring:
    """The keys in force: the master key, keys declared in the config, and keys kept in the database."""

    def __init__(self, auth: AuthConfig, connect: Connect | None) -> None:
        self._master = auth.master_key.encode() if auth.master_key else None
        self.required = auth.required
        now = time.time()
        self.declared = {d.id: ApiKey.declared(d, now) for d in auth.keys}
        self.keys: dict[str, ApiKey] = dict(self.declared)
        self._verified: dict[str, Principal] = {}
        self._connect = connect
        self._interval = auth.key_sync_interval
        self._store: KeyStore | None = None
        self._version = 0
        self._task: asyncio.Task[None] | None = None
        self._outage = False

    @property
    def has_master(self) -> bool:
        return self._master is not None

    def authenticate(self, presented: str) -> Principal | None:
        """The principal behind a presented key, or None for a missing, unknown, expired or revoked one.

        A key value is hashed once; later requests with it are a dict lookup.
        """
        key_id = key_id_of(presented)
        if key_id is not None:
            key = self.keys.get(key_id)
            if key is not None:
                # A key changed or rotated is a new object, so a verification is never reused for it.
                principal = self._verified.get(presented)
                if principal is None or principal.key is not key:
                    principal = self._verify(presented, key)
                if principal is not None:
                    return principal if key.usable(time.time()) else None
        if self._master is not None and hmac.compare_digest(presented.encode("utf-8", "surrogateescape"),
                                                            self._master):
            return MASTER
        return None

    def _verify(self, presented: str, key: ApiKey) -> Principal | None:
        if not hmac.compare_digest(digest_of(presented), key.digest):
            return None
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        principal = self._verified[presented] = Principal(key)
        return principal

    # -- keeping in step with the database --------------------------------------------------------

    async def start(self) -> None:
        """Read the stored keys (waiting a few seconds at most), then keep polling for changes."""
        if self._connect is None:
            return
        try:
            await asyncio.wait_for(self.sync(), timeout=5.0)
        except (StorageError, TimeoutError) as exc:
            self._store = None
            self._outage = True
            log.warning("cannot read keys from the database at start-up (%s); only the master key and the "
                        "config's keys are in force until it answers", str(exc) or "no answer in 5s")
        self._task = asyncio.create_task(self._poll(), name="key-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await asyncio.wait_for(self.sync(), timeout=5.0)
                if self._outage:
                    log.info("the key database answers again; keys are in step")
                self._outage = False
            except Exception as exc:  # the poll must outlive any failure; the log says why
                self._store = None
                if not self._outage:
                    log.warning("cannot read keys from the database (%s); the last known keys stay in force",
                                str(exc) or "no answer in 5s")
                self._outage = True

    async def store(self) -> KeyStore:
        if self._store is None:
            if self._connect is None:
                raise Conflict("this gateway keeps no key database, so keys can only be declared in its config")
            self._store = KeyStore(await self._connect())
        return self._store

    async def _write(self, write: Callable[[KeyStore], Awaitable[StoredKey | None]]) -> StoredKey | None:
        """A key write; a database that cannot be reached is a 503 (nothing is changed)."""
        try:
            return await write(await self.store())
        except StorageError as exc:
            self._store = None
            raise DatabaseUnavailable(f"the key database cannot be written: {exc}") from exc

    async def sync(self) -> None:
        """Apply every change since the last one seen."""
        store = await self.store()
        for stored in await store.changes_since(self._version):
            self._version = max(self._version, stored.version)
            self._apply(stored)

    def _apply(self, stored: StoredKey) -> None:
        """Put a stored key in force. The version seen moves only in `sync`: a write of this replica
        must not skip a change another replica committed just before it."""
        if stored.id in self.declared:
            return  # the config file is the source of truth for its own keys
        if stored.deleted:
            self.keys.pop(stored.id, None)
            return
        try:
            settings = KeySettings.model_validate(stored.data)
        except ValueError as exc:
            log.error("stored key %s is not valid (%s); it is not in force", stored.id, exc)
            self.keys.pop(stored.id, None)
            return
        self.keys[stored.id] = ApiKey.build(stored.id, stored.hash, settings, stored.created_at)

    # -- management -----------------------------------------------------------------------------

    def find(self, reference: str) -> ApiKey:
        """A key by its id or by the key itself (LiteLLM scripts pass the key); 404 when unknown."""
        key_id = key_id_of(reference) or reference
        key = self.keys.get(key_id)
        if key is None or (key_id != reference and not matches_hash(reference, key.hash)):
            raise NotFound("no such key; `synapse keys list` (GET /key/list) shows the keys")
        return key

    async def create(self, settings: KeySettings) -> tuple[ApiKey, str]:
        """A new key; the returned secret is shown once and never kept."""
        key_id, secret = new_key()
        while key_id in self.keys or key_id in self.declared:
            key_id, secret = new_key()
        self._apply_written(await self._write(lambda store: store.put(key_id, hash_key(secret), _data(settings))))
        return self.keys[key_id], secret

    async def update(self, reference: str, changes: dict[str, Any]) -> ApiKey:
        key = self.writable(reference)
        settings = KeySettings.model_validate({**_data(key.settings), **changes})
        self._apply_written(await self._write(lambda store: store.put(key.id, key.hash, _data(settings))))
        return self.keys[key.id]

    async def rotate(self, reference: str) -> tuple[ApiKey, str]:
        """A new secret for the same key (id, limits and spend kept); the old secret stops at once."""
        key = self.writable(reference)
        _, secret = new_key(key.id)
        self._apply_written(await self._write(lambda store: store.put(key.id, hash_key(secret), _data(key.settings))))
        return self.keys[key.id], secret

    async def delete(self, reference: str) -> ApiKey:
        key = self.writable(reference)
        await self._write(lambda store: store.delete(key.id))
        self.keys.pop(key.id, None)
        return key

    def _apply_written(self, stored: StoredKey | None) -> None:
        assert stored is not None, "a put always returns the stored key"
        self._apply(stored)

    def writable(self, reference: str) -> ApiKey:
        key = self.find(reference)
        if key.source == "config":
            raise Conflict(f"key {key.id} is declared in the config file; change it there",
                           code="key_declared_in_config")
        return key


def _data(settings: KeySettings) -> dict[str, Any]:
    return settings.model_dump(mode="json")
