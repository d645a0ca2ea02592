"""The API key cache's rules, on a fake clock: what it answers and when it
must not."""

from __future__ import annotations

import pytest

from service import key_cache
from service.api_keys import Principal, Scope
from service.key_cache import ApiKeyCache

KEY_ID = "0123456789abcdef"
KEY = f"otk_{KEY_ID}_" + "s" * 43
ALICE = Principal(name="alice", key_id=KEY_ID, scopes=frozenset({Scope.TASKS_READ}))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> ApiKeyCache:
    cache = ApiKeyCache(30, clock=clock)
    cache.listening()
    return cache


def test_a_remembered_key_is_answered_until_it_expires(
    cache: ApiKeyCache, clock: Clock
) -> None:
    cache.remember(KEY, ALICE, cache.generation)
    assert cache.principal(KEY_ID, KEY) == ALICE

    clock.now += 29.9
    assert cache.principal(KEY_ID, KEY) == ALICE
    clock.now += 0.1
    assert cache.principal(KEY_ID, KEY) is None


def test_another_secret_under_the_same_key_id_is_not_answered(
    cache: ApiKeyCache,
) -> None:
    cache.remember(KEY, ALICE, cache.generation)
    forged = f"otk_{KEY_ID}_" + "f" * 43
    assert cache.principal(KEY_ID, forged) is None


def test_a_change_forgets_every_key(cache: ApiKeyCache) -> None:
    cache.remember(KEY, ALICE, cache.generation)
    cache.forget_all()
    assert cache.principal(KEY_ID, KEY) is None


def test_a_lookup_that_raced_a_change_is_not_remembered(cache: ApiKeyCache) -> None:
    started = cache.generation
    cache.forget_all()  # the key was revoked while the lookup ran
    cache.remember(KEY, ALICE, started)
    assert cache.principal(KEY_ID, KEY) is None


def test_nothing_is_answered_or_kept_while_changes_are_not_heard(
    clock: Clock,
) -> None:
    cache = ApiKeyCache(30, clock=clock)
    cache.remember(KEY, ALICE, cache.generation)
    assert cache.principal(KEY_ID, KEY) is None

    cache.listening()
    cache.remember(KEY, ALICE, cache.generation)
    cache.deaf()
    assert cache.principal(KEY_ID, KEY) is None

    # Back: it starts empty, since changes made meanwhile were not heard.
    cache.listening()
    assert cache.principal(KEY_ID, KEY) is None


def test_a_time_of_zero_caches_nothing(clock: Clock) -> None:
    cache = ApiKeyCache(0, clock=clock)
    cache.listening()
    cache.remember(KEY, ALICE, cache.generation)
    assert cache.principal(KEY_ID, KEY) is None


def test_the_oldest_entry_makes_room(
    cache: ApiKeyCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(key_cache, "MAX_ENTRIES", 2)
    keys = [(f"{n:016x}", f"otk_{n:016x}_" + "s" * 43) for n in range(3)]
    for key_id, key in keys:
        principal = Principal(name="p", key_id=key_id, scopes=frozenset())
        cache.remember(key, principal, cache.generation)

    assert [cache.principal(key_id, key) is not None for key_id, key in keys] == [
        False,
        True,
        True,
    ]
