"""KeyedLocks: one holder per key at a time, in arrival order, and nothing kept for free keys."""

from __future__ import annotations

import asyncio

import pytest

from metalake.server.locks import KeyedLocks


async def test_holders_of_one_key_take_turns_in_arrival_order() -> None:
    locks = KeyedLocks()
    inside: list[str] = []
    order: list[str] = []

    async def hold(name: str) -> None:
        async with locks.hold("k"):
            inside.append(name)
            assert inside == [name]  # alone in the body
            order.append(name)
            await asyncio.sleep(0.01)
            inside.remove(name)

    await asyncio.gather(*(hold(f"h{i}") for i in range(5)))
    assert order == [f"h{i}" for i in range(5)]


async def test_other_keys_do_not_wait() -> None:
    locks = KeyedLocks()
    async with locks.hold("a"):
        async with asyncio.timeout(1):
            async with locks.hold("b"):
                pass


async def test_a_free_key_keeps_nothing() -> None:
    locks = KeyedLocks()
    async with locks.hold("k"):
        pass
    with pytest.raises(RuntimeError):
        async with locks.hold("k"):
            raise RuntimeError("the body failed")
    assert locks._held == {}


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    locks = KeyedLocks()
    await locks.acquire("k")
    got: list[str] = []

    async def wait(name: str) -> None:
        async with locks.hold("k"):
            got.append(name)

    first = asyncio.create_task(wait("first"))
    second = asyncio.create_task(wait("second"))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    locks.release("k")
    async with asyncio.timeout(5):
        await second
    assert first.cancelled()
    assert got == ["second"]
    assert locks._held == {}


async def test_a_waiter_cancelled_as_its_turn_comes_hands_it_on() -> None:
    locks = KeyedLocks()
    await locks.acquire("k")
    got: list[str] = []

    async def wait(name: str) -> None:
        async with locks.hold("k"):
            got.append(name)

    first = asyncio.create_task(wait("first"))
    second = asyncio.create_task(wait("second"))
    await asyncio.sleep(0)
    locks.release("k")  # the key is now first's ...
    first.cancel()  # ... which is cancelled before it runs again
    async with asyncio.timeout(5):  # the key, kept by a cancelled holder, would hang second
        await asyncio.gather(first, second, return_exceptions=True)
    assert first.cancelled()
    assert got == ["second"]
    assert locks._held == {}
