"""Who is calling, and whether the route lets them: bearer keys and scopes.

:class:`ApiAccessMiddleware` sits on the ``/api/v1`` router, so every route
under it, including ones added later, requires a key; a route cannot opt out
of its router's middleware. It puts the caller's
:class:`~service.api_keys.Principal` in the request's ``user``, counts the
request against the principal's rate, then checks the scope the route names
in ``opt["scope"]``. A route that names none needs ``admin``.

It runs before the body is read, so a request without a key costs one index
lookup and never a body parse. A live key's principal is remembered for a
while (:mod:`service.key_cache`), forgotten as soon as any key changes.
"""

from __future__ import annotations

import re

import structlog
from litestar.datastructures import State
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from service import api_keys
from service.api_keys import Principal
from service.database import pooled
from service.errors import AuthenticationError, MissingScopeError
from service.key_cache import ApiKeyCache
from service.rate_limit import PrincipalRateLimiter

#: RFC 6750 credentials: the scheme is case-insensitive, the token is one word.
_BEARER = re.compile(r"bearer +(?P<token>[^\s]+) *", re.IGNORECASE)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if header is None:
        return None
    match = _BEARER.fullmatch(header)
    return match["token"] if match else None


class ApiAccessMiddleware(ASGIMiddleware):
    """Who is calling, whether their rate allows it, whether the route does.

    Set on the ``/api/v1`` router, so it runs for every route under it,
    before the body is read, in this order:

    1. the key must be live: the principal becomes the request's ``user``
       (401 otherwise);
    2. the request counts against the principal's rate (429 when over it);
       a refused request costs the server too, so it counts before the
       scope is checked;
    3. the key must carry the scope the route names in ``opt["scope"]``
       (``admin`` when it names none; 403 otherwise).

    One middleware rather than three guards: Litestar copies the route
    handler for every guard it calls, which costs more than the checks.
    """

    scopes = (ScopeType.HTTP,)

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp
    ) -> None:
        state = scope["litestar_app"].state
        principal = await _principal(scope, state)
        structlog.contextvars.bind_contextvars(principal=principal.name)
        scope["user"] = principal
        scope["auth"] = principal.key_id

        limiter: PrincipalRateLimiter | None = state.rate_limiter
        if limiter is not None:
            await limiter.hit(principal.name)

        route_handler = scope["route_handler"]
        needed = api_keys.Scope(route_handler.opt.get("scope", api_keys.Scope.ADMIN))
        if not principal.allows(needed):
            raise MissingScopeError(needed.value)

        await next_app(scope, receive, send)


async def _principal(scope: Scope, state: State) -> Principal:
    header = None
    for key, value in scope["headers"]:
        if key == b"authorization":
            header = value.decode("latin-1")
            break
    token = bearer_token(header)
    if token is None:
        raise AuthenticationError(presented=header is not None)
    key_id = api_keys.key_id_of(token)
    if key_id is None:
        raise AuthenticationError(presented=True)

    cache: ApiKeyCache = state.key_cache
    principal = cache.principal(key_id, token)
    if principal is not None:
        return principal

    # Taken before the lookup: a key revoked while it runs is not cached.
    generation = cache.generation
    async with pooled(state.driver_pool) as conn:
        principal = await api_keys.authenticate(conn, token)
    if principal is None:
        raise AuthenticationError(presented=True)
    cache.remember(token, principal, generation)
    return principal
