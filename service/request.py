"""The request class of the API: a body nested too deeply is the client's error.

msgspec decodes JSON recursively and gives up with RecursionError at about a
thousand levels; a 1 MiB body can nest far deeper. Litestar would treat that
as a bug (500), so it is turned into the serialisation error that malformed
JSON raises, which ``service.problems`` answers with 400.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.exceptions import SerializationException


class ServiceRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            raise SerializationException(
                "The JSON body is nested too deeply."
            ) from None
