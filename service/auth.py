"""Who is calling, and whether the route lets them: bearer keys and scopes.

Both checks are guards on the ``/api/v1`` router, so every route under it,
including ones added later, requires a key; a route cannot opt out of its
router's guards. ``require_api_key`` puts the caller's
:class:`~service.api_keys.Principal` in the request's ``user``;
``require_scope`` then checks the scope the route names in ``opt["scope"]``.
A route that names none needs ``admin``.

Guards run before the body is read, so a request without a key costs one
index lookup and never a body parse.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from service import api_keys
from service.api_keys import Principal
from service.errors import AuthenticationError, MissingScopeError

#: RFC 6750 credentials: the scheme is case-insensitive, the token is one word.
_BEARER = re.compile(r"bearer +(?P<token>[^\s]+) *", re.IGNORECASE)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if header is None:
        return None
    match = _BEARER.fullmatch(header)
    return match["token"] if match else None


async def require_api_key(
    connection: ASGIConnection[Any, Any, Any, Any],
    route_handler: BaseRouteHandler,
) -> None:
    """Guard: refuse requests without a live API key; name the principal of the rest.

    The principal becomes the request's ``user``.
    """
    header = connection.headers.get("authorization")
    token = bearer_token(header)
    if token is None:
        raise AuthenticationError(presented=header is not None)

    # Looked up on every request, without a cache, so a revoked key stops
    # working at once on every replica. One read needs no transaction:
    # autocommit spares the BEGIN and ROLLBACK round trips.
    async with connection.app.state.engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        principal = await api_keys.authenticate(conn, token)
    if principal is None:
        raise AuthenticationError(presented=True)

    structlog.contextvars.bind_contextvars(principal=principal.name)
    connection.scope["user"] = principal
    connection.scope["auth"] = principal.key_id


def require_scope(
    connection: ASGIConnection[Any, Principal, Any, Any],
    route_handler: BaseRouteHandler,
) -> None:
    """Guard: the key must carry the scope the route names (admin by default)."""
    needed = api_keys.Scope(route_handler.opt.get("scope", api_keys.Scope.ADMIN))
    if not connection.user.allows(needed):
        raise MissingScopeError(needed.value)
