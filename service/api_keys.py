"""API keys: how they look, how they are stored and how a presented one is checked.

A key reads ``otk_<key id>_<secret>``. The prefix makes a leaked key easy to
recognise (secret scanners, log searches); the key id is public and is what a
presented key is looked up by; the secret is 256 random bits. The database
keeps only the SHA-256 of the whole key, so neither a copy of the table nor a
log of queries reveals a usable key. The key itself is shown once, when it is
created.

The API remembers the principal of a key it found live for a short while,
and forgets every key as soon as any key changes (``service.key_cache``), so
revoking one takes effect at once on every API replica.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from service import queries
from service.models import ApiKey

KEY_PREFIX = "otk"
_KEY = re.compile(rf"{KEY_PREFIX}_(?P<key_id>[0-9a-f]{{16}})_[A-Za-z0-9_-]{{43}}")
#: Principal names: short and printable.
PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}")
#: What a key id looks like; no principal may be named like one, so that
#: ``revoke`` can tell which of the two it was given.
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class Scope(enum.StrEnum):
    TASKS_READ = "tasks:read"
    TASKS_WRITE = "tasks:write"
    #: Every other scope, and every principal's tasks.
    ADMIN = "admin"


DEFAULT_SCOPES = (Scope.TASKS_READ, Scope.TASKS_WRITE)


@dataclass(frozen=True, kw_only=True)
class Principal:
    """Who is calling: the name a key belongs to and what the key may do."""

    name: str
    key_id: str
    scopes: frozenset[Scope]

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    def allows(self, scope: Scope) -> bool:
        return self.is_admin or scope in self.scopes


@dataclass(frozen=True, kw_only=True)
class NewApiKey:
    """A key just created; ``key`` exists nowhere else and is never shown again."""

    key_id: str
    name: str
    scopes: tuple[Scope, ...]
    key: str = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class ApiKeyInfo:
    """What can be shown about a stored key: everything but the key."""

    key_id: str
    name: str
    scopes: tuple[Scope, ...]
    created_at: datetime
    revoked_at: datetime | None


def hash_key(key: str) -> str:
    # A fast hash is enough here, unlike for passwords: the secret has 256
    # random bits, so guessing it from the hash is hopeless however many
    # hashes per second an attacker computes, and checking a key stays cheap
    # enough to do on every request.
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(presented: str) -> str | None:
    """The key id of a well-formed key; None for anything else."""
    match = _KEY.fullmatch(presented)
    return match["key_id"] if match else None


def _scopes(values: Iterable[str]) -> tuple[Scope, ...]:
    return tuple(sorted({Scope(value) for value in values}))


async def create_api_key(
    conn: AsyncConnection, name: str, scopes: Iterable[Scope] = DEFAULT_SCOPES
) -> NewApiKey:
    """Store a new key for principal ``name`` and return it, with its secret."""
    if not PRINCIPAL_NAME.fullmatch(name) or _KEY_ID.fullmatch(name):
        raise ValueError(
            "a principal name is 1-100 letters, digits or . _ @ -, starting "
            "with a letter or digit, and does not look like a key id"
        )
    chosen = _scopes(scopes)
    if not chosen:
        raise ValueError("a key needs at least one scope")

    key_id = secrets.token_hex(8)
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    async with conn.begin():
        await conn.execute(
            insert(ApiKey).values(
                key_id=key_id,
                name=name,
                scopes=[scope.value for scope in chosen],
                key_hash=hash_key(key),
            )
        )
    return NewApiKey(key_id=key_id, name=name, scopes=chosen, key=key)


async def list_api_keys(conn: AsyncConnection) -> list[ApiKeyInfo]:
    rows = await conn.execute(
        select(
            ApiKey.key_id,
            ApiKey.name,
            ApiKey.scopes,
            ApiKey.created_at,
            ApiKey.revoked_at,
        ).order_by(ApiKey.name, ApiKey.created_at)
    )
    return [
        ApiKeyInfo(
            key_id=row.key_id,
            name=row.name,
            scopes=_scopes(row.scopes),
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )
        for row in rows
    ]


async def revoke_api_keys(conn: AsyncConnection, key_id_or_name: str) -> list[str]:
    """Revoke one key by its id, or every key of a principal by its name.

    Returns the ids of the keys revoked now; keys revoked before stay as
    they were. The next request with a revoked key is refused.
    """
    matches = (
        ApiKey.key_id == key_id_or_name
        if _KEY_ID.fullmatch(key_id_or_name)
        else ApiKey.name == key_id_or_name
    )
    async with conn.begin():
        rows = await conn.execute(
            update(ApiKey)
            .where(matches, ApiKey.revoked_at.is_(None))
            .values(revoked_at=func.now())
            .returning(ApiKey.key_id)
        )
        return sorted(rows.scalars())


async def authenticate(
    conn: asyncpg.Connection[Any], presented: str
) -> Principal | None:
    """The principal of a presented key, or None if it is not a live key.

    One indexed read on the driver's connection: this runs for every request.
    """
    key_id = key_id_of(presented)
    if key_id is None:
        return None

    row = await conn.fetchrow(queries.AUTHENTICATE, key_id)
    # Compared in constant time, so the response time tells nothing about
    # how much of a guessed secret was right.
    if row is None or not hmac.compare_digest(row["key_hash"], hash_key(presented)):
        return None
    return Principal(
        name=row["name"], key_id=key_id, scopes=frozenset(_scopes(row["scopes"]))
    )
