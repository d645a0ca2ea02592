from __future__ import annotations

import re

import pytest

from service.api_keys import NewApiKey, Principal, Scope, hash_key, key_id_of
from service.auth import bearer_token
from service.errors import RequestValidationError
from service.settings import ServiceSettings
from service.tasks import check_payload

KEY = "otk_0123456789abcdef_" + "A-_z" * 10 + "abc"


def test_a_well_formed_key_gives_its_id() -> None:
    assert len(KEY) == 64
    assert key_id_of(KEY) == "0123456789abcdef"


@pytest.mark.parametrize(
    "presented",
    [
        "",
        KEY[:-1],
        KEY + "x",
        KEY.replace("otk_", "xyz_"),
        KEY.replace("0123456789abcdef", "0123456789ABCDEF"),
        KEY.replace("A-_z", "A+/z", 1),
        KEY + "\n",
        " " + KEY,
    ],
)
def test_anything_else_has_no_key_id(presented: str) -> None:
    assert key_id_of(presented) is None


def test_the_hash_is_sha256_hex_and_never_the_key() -> None:
    digest = hash_key(KEY)

    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest != hash_key(KEY[:-1] + "d")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("Bearer a b", None),
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
    ],
)
def test_bearer_credentials_are_parsed_strictly(
    header: str | None, token: str | None
) -> None:
    assert bearer_token(header) == token


def test_admin_allows_every_scope_others_only_their_own() -> None:
    reader = Principal(name="r", key_id="k", scopes=frozenset({Scope.TASKS_READ}))
    admin = Principal(name="a", key_id="k", scopes=frozenset({Scope.ADMIN}))

    assert reader.allows(Scope.TASKS_READ)
    assert not reader.allows(Scope.TASKS_WRITE) and not reader.allows(Scope.ADMIN)
    assert all(admin.allows(scope) for scope in Scope)
    assert not reader.is_admin and admin.is_admin


def nested(depth: int) -> object:
    value: object = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_payload_depth_size_and_nul_limits() -> None:
    limits = {"max_bytes": 100, "max_depth": 4}

    check_payload({"a": nested(3)}, **limits)
    for bad, field in [
        ({"a": nested(4)}, "payload"),
        ({"a": "x" * 100}, "payload"),
        ({"a": ["ok", "n\x00l"]}, "payload.a[1]"),
        ({"a": {"k\x00": 1}}, "payload.a"),
    ]:
        with pytest.raises(RequestValidationError) as caught:
            check_payload(bad, **limits)
        assert caught.value.errors[0][0] == field


def test_a_payload_deeper_than_the_interpreter_stack_is_checked() -> None:
    with pytest.raises(RequestValidationError):
        check_payload({"a": nested(100_000)}, max_bytes=10**7, max_depth=32)


def test_secrets_stay_out_of_reprs() -> None:
    created = NewApiKey(
        key_id="0123456789abcdef", name="n", scopes=(Scope.ADMIN,), key=KEY
    )
    settings = ServiceSettings(
        rate_limit_storage_url="redis://:hunter2@cache:6379/0",
        database_url="postgresql://app:s3cret@db/tasks",
    )

    assert KEY not in repr(created) and "0123456789abcdef" in repr(created)
    assert "hunter2" not in repr(settings) and "s3cret" not in repr(settings)
