"""Small files stored in turns (metalake.server.ingest.gate): who waits, for whom, how long."""

from __future__ import annotations

import asyncio

import pytest

from metalake.server.ingest.gate import Coming, SmallFileGate

# Long enough that a test waiting for it would time out first: a turn that opens sooner opened
# for a reason of its own, not for the linger.
FOREVER = 60.0


async def _arrive(coming: Coming, order: list[str], name: str) -> None:
    await coming.arrive()
    order.append(name)


async def test_an_upload_with_none_other_under_way_goes_on_at_once() -> None:
    gate = SmallFileGate(linger=FOREVER, most=8)
    with gate.coming() as coming:
        await asyncio.wait_for(coming.arrive(), timeout=5)


async def test_an_upload_waits_for_the_one_under_way_then_both_go_on_in_arrival_order() -> None:
    gate = SmallFileGate(linger=FOREVER, most=8)
    order: list[str] = []
    with gate.coming() as first, gate.coming() as second:
        waiting = asyncio.create_task(_arrive(first, order, "first"))
        await asyncio.sleep(0.05)
        assert not waiting.done(), "went on while another upload was on its way"
        await asyncio.wait_for(_arrive(second, order, "second"), timeout=5)
        await asyncio.wait_for(waiting, timeout=5)
    assert order == ["first", "second"]


async def test_an_upload_waits_no_longer_than_the_linger() -> None:
    gate = SmallFileGate(linger=0.05, most=8)
    with gate.coming() as arriving, gate.coming():  # the second never arrives
        waiting = asyncio.create_task(arriving.arrive())
        await asyncio.sleep(0)
        assert not waiting.done()
        await asyncio.wait_for(waiting, timeout=5)


async def test_uploads_go_on_once_the_most_wait() -> None:
    gate = SmallFileGate(linger=FOREVER, most=2)
    with gate.coming() as first, gate.coming() as second, gate.coming():
        waiting = asyncio.create_task(first.arrive())
        await asyncio.sleep(0)
        await asyncio.wait_for(second.arrive(), timeout=5)
        await asyncio.wait_for(waiting, timeout=5)


@pytest.mark.parametrize("how", ["leaves", "fails"])
async def test_an_upload_that_will_not_arrive_releases_those_waiting(how: str) -> None:
    gate = SmallFileGate(linger=FOREVER, most=8)
    with gate.coming() as small:
        large = gate.coming()
        waiting = asyncio.create_task(small.arrive())
        await asyncio.sleep(0)
        assert not waiting.done()
        if how == "leaves":  # proved large: it never comes to the gate
            large.leave()
        else:
            with pytest.raises(ValueError, match="garbage"), large:
                raise ValueError("its client sent garbage")
        await asyncio.wait_for(waiting, timeout=5)


async def test_a_cancelled_upload_does_not_hold_the_others() -> None:
    gate = SmallFileGate(linger=FOREVER, most=8)
    with gate.coming() as gone, gate.coming() as kept, gate.coming() as last:
        cancelled = asyncio.create_task(gone.arrive())
        waiting = asyncio.create_task(kept.arrive())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        assert cancelled.cancelled()
        assert not waiting.done()
        await asyncio.wait_for(last.arrive(), timeout=5)
        await asyncio.wait_for(waiting, timeout=5)


async def test_a_gate_opened_starts_afresh() -> None:
    """After a turn has gone on, a lone upload again goes on at once (no linger left over)."""
    gate = SmallFileGate(linger=FOREVER, most=8)
    with gate.coming() as first, gate.coming() as second:
        waiting = asyncio.create_task(first.arrive())
        await asyncio.sleep(0)
        await second.arrive()
        await waiting
    with gate.coming() as alone:
        await asyncio.wait_for(alone.arrive(), timeout=5)


async def test_an_upload_waits_while_one_that_went_on_is_still_storing() -> None:
    """One stream keeps a few files in flight and sends the next only once one is answered: a
    file arriving while another is being stored waits for it (or the linger), so that the files
    the answer lets in can join it."""
    gate = SmallFileGate(linger=FOREVER, most=8)
    with gate.coming() as storing:
        await asyncio.wait_for(storing.arrive(), timeout=5)  # alone: on at once
        with gate.coming() as next_file:
            waiting = asyncio.create_task(next_file.arrive())
            await asyncio.sleep(0.05)
            assert not waiting.done(), "went on while another upload was under way"
            storing.leave()  # stored and answered
            await asyncio.wait_for(waiting, timeout=5)
