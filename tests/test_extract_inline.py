"""Trusted extractors on a small file's bytes run on the event loop's thread, interrupted past a
budget and run again on a runner thread (extractors.interrupt, ExtractorRegistry.extract_async).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from metalake.extractors import Source, hookimpl, interrupt
from metalake.extractors import registry as registry_module
from metalake.extractors.registry import ExtractorRegistry, builtin_plugins
from metalake.extractors.testing import sample_exif, save_with_pillow


class Recording:
    """Fills one field and records the thread each call ran on."""

    def __init__(self, name: str, field: str) -> None:
        self.NAME = name
        self.field = field
        self.threads: list[threading.Thread] = []

    @hookimpl
    def metalake_extract_metadata(self, source: Source) -> Mapping[str, object]:
        self.threads.append(threading.current_thread())
        return {self.field: f"from {self.NAME}"}


class SlowOnTheLoop:
    """Spins on the main thread, swallowing the first interruption as a bare `except:` would,
    and answers at once anywhere else."""

    NAME = "slow"

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.swallowed = 0

    @hookimpl
    def metalake_extract_metadata(self, source: Source) -> Mapping[str, object]:
        self.threads.append(threading.current_thread())
        while threading.current_thread() is threading.main_thread():
            try:
                time.sleep(0.001)
            except BaseException:
                if self.swallowed:
                    raise
                self.swallowed += 1
        return {"software": "slow but sure"}


class SpinningEverywhere:
    NAME = "spinning"

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.calls = 0

    @hookimpl
    def metalake_extract_metadata(self, source: Source) -> Mapping[str, object]:
        self.calls += 1
        while not self.stop.is_set():
            time.sleep(0.001)
        return {"software": "never seen"}


@pytest.fixture
def spinning() -> Iterator[SpinningEverywhere]:
    plugin = SpinningEverywhere()
    try:
        yield plugin
    finally:
        plugin.stop.set()  # let the abandoned thread finish


def no_timer_left() -> bool:
    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


async def test_trusted_extractors_run_on_the_loops_thread_and_the_others_on_a_runner() -> None:
    trusted = Recording("trusted", "software")
    other = Recording("other", "manufacturer")
    registry = ExtractorRegistry([trusted, other], trusted=["trusted"])
    found = await registry.extract_async(b"small file", filename="a.bin")
    assert found.values == {"software": "from trusted", "manufacturer": "from other"}
    assert found.sources == {"software": "trusted", "manufacturer": "other"}
    assert trusted.threads == [threading.main_thread()]
    assert other.threads[0] is not threading.main_thread()
    assert no_timer_left()


async def test_an_untrusted_extractor_before_a_trusted_one_sends_the_whole_chain_away() -> None:
    # The order is the contract: a trusted extractor after an untrusted one runs after it.
    other = Recording("other", "manufacturer")
    trusted = Recording("trusted", "software")
    registry = ExtractorRegistry([other, trusted], trusted=["trusted"])
    await registry.extract_async(b"small file", filename="a.bin")
    assert trusted.threads[0] is not threading.main_thread()


async def test_a_spooled_file_is_never_read_on_the_loop(tmp_path: Path) -> None:
    trusted = Recording("trusted", "software")
    path = tmp_path / "a.bin"
    path.write_bytes(b"a file on disk")
    registry = ExtractorRegistry([trusted], trusted=["trusted"])
    assert (await registry.extract_async(path)).values == {"software": "from trusted"}
    assert trusted.threads[0] is not threading.main_thread()


async def test_with_a_wrapper_around_every_call_nothing_runs_on_the_loop() -> None:
    class Wrapper:
        NAME = "wrapper"

        @hookimpl(wrapper=True)
        def metalake_extract_metadata(self) -> Iterator[None]:
            return (yield)

    trusted = Recording("trusted", "software")
    registry = ExtractorRegistry([trusted, Wrapper()], trusted=["trusted"])
    assert (await registry.extract_async(b"x", filename="a.bin")).values == {
        "software": "from trusted"
    }
    assert trusted.threads[0] is not threading.main_thread()


async def test_a_trusted_extractor_past_its_budget_is_interrupted_and_run_again_elsewhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    slow = SlowOnTheLoop()
    after = Recording("after", "manufacturer")
    registry = ExtractorRegistry([slow, after], trusted=["slow", "after"])
    found = await registry.extract_async(b"hostile", filename="hostile.bin")
    # Interrupted again after it swallowed the first interruption.
    assert slow.swallowed == 1
    # Its value, from its second run; the extractor after it ran on the runner thread too.
    assert found.values == {"software": "slow but sure", "manufacturer": "from after"}
    assert found.errors == []
    assert slow.threads[0] is threading.main_thread()
    assert slow.threads[1] is not threading.main_thread()
    assert after.threads == [slow.threads[1]]
    assert "loop's 0.05 s for hostile.bin were spent with extractor 'slow' to run" in caplog.text
    assert no_timer_left()


class Sleeping(Recording):
    def __init__(self, name: str, field: str, seconds: float) -> None:
        super().__init__(name, field)
        self.seconds = seconds

    @hookimpl
    def metalake_extract_metadata(self, source: Source) -> Mapping[str, object]:
        self.threads.append(threading.current_thread())
        time.sleep(self.seconds)
        return {self.field: f"from {self.NAME}"}


async def test_the_budget_is_for_all_of_a_files_calls_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each within the budget, together past it: the second is interrupted and made again. (A
    # budget of 0.5 s, so that a loaded machine's late wake-ups cannot push the first past it.)
    monkeypatch.setattr(registry_module, "INLINE_BUDGET", 0.5)
    first = Sleeping("first", "software", 0.3)
    second = Sleeping("second", "manufacturer", 0.3)
    registry = ExtractorRegistry([first, second], trusted=["first", "second"])
    found = await registry.extract_async(b"x", filename="a.bin")
    assert found.values == {"software": "from first", "manufacturer": "from second"}
    assert first.threads == [threading.main_thread()]
    assert second.threads[0] is threading.main_thread()
    assert second.threads[1] is not threading.main_thread()
    assert no_timer_left()


async def test_an_extractor_stuck_everywhere_times_out_on_the_runner(
    spinning: SpinningEverywhere,
) -> None:
    registry = ExtractorRegistry([spinning], timeout=0.2, trusted=["spinning"])
    found = await registry.extract_async(b"x", filename="a.bin")
    assert found.values == {}
    assert found.errors == [("spinning", "timed out after 0.2 s")]
    assert no_timer_left()


async def test_an_extractor_with_too_many_calls_stuck_is_not_called_on_the_loop_either(
    spinning: SpinningEverywhere,
) -> None:
    registry = ExtractorRegistry([spinning], timeout=0.1, trusted=["spinning"])
    most = registry_module.MAX_STUCK_PER_EXTRACTOR
    for _ in range(most):  # each interrupted on the loop, then stuck on a runner
        await registry.extract_async(b"x", filename="a.bin")
    assert spinning.calls == 2 * most
    found = await registry.extract_async(b"x", filename="a.bin")
    assert found.errors == [("spinning", f"{most} earlier calls still running past the time limit")]
    assert spinning.calls == 2 * most
    assert no_timer_left()


async def test_results_on_the_loop_match_the_runners(tmp_path: Path) -> None:
    content = save_with_pillow(tmp_path / "a.jpg", sample_exif()).read_bytes()
    names = [name for name, _ in builtin_plugins()]
    expected = await ExtractorRegistry(builtin_plugins()).extract_async(content, filename="a.jpg")
    inline = ExtractorRegistry(builtin_plugins(), trusted=names)
    found = await inline.extract_async(content, filename="a.jpg")
    assert found.values
    assert found.values == expected.values
    assert found.sources == expected.sources


def test_the_servers_registry_trusts_the_built_ins_only() -> None:
    registry = ExtractorRegistry.from_environment({})
    assert registry.trusted == {name for name, _ in builtin_plugins()}


def test_off_the_main_thread_the_loop_hands_every_call_to_a_runner() -> None:
    trusted = Recording("trusted", "software")
    registry = ExtractorRegistry([trusted], trusted=["trusted"])
    caller: list[threading.Thread] = []

    def run() -> None:
        caller.append(threading.current_thread())
        asyncio.run(registry.extract_async(b"x", filename="a.bin"))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert trusted.threads
    assert trusted.threads[0] not in (caller[0], threading.main_thread())


def test_a_sigalrm_handler_of_someone_else_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def theirs(signum: int, frame: object) -> None:
        pass

    monkeypatch.setattr(interrupt, "_installed", None)
    previous = signal.signal(signal.SIGALRM, theirs)
    try:
        assert not interrupt.available()
        assert signal.getsignal(signal.SIGALRM) is theirs
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_a_call_within_its_budget_returns_and_leaves_no_timer() -> None:
    assert interrupt.available()
    with interrupt.budget(1.0):
        assert interrupt.run(lambda value: value * 2, 21) == 42
    assert no_timer_left()
    with pytest.raises(ZeroDivisionError), interrupt.budget(1.0):
        interrupt.run(lambda: 1 / 0)
    assert no_timer_left()
    # A late alarm, once no call runs, interrupts nothing.
    signal.setitimer(signal.ITIMER_REAL, 0.001)
    time.sleep(0.05)
    assert no_timer_left()


def test_calls_share_one_budget_and_a_spent_one_starts_no_call() -> None:
    assert interrupt.available()
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        time.sleep(0.15)

    def second() -> None:
        ran.append("second")
        for _ in range(200):  # 2 s unless interrupted
            time.sleep(0.01)
        ran.append("second finished")

    # The second call gets what the first left of 0.3 s, not 0.3 s of its own.
    with interrupt.budget(0.3):
        interrupt.run(first)
        with pytest.raises(interrupt.OverBudget):
            interrupt.run(second)
    assert ran == ["first", "second"]
    assert no_timer_left()
    # Spent while no call ran (the registry merging a result): the next call does not start.
    with interrupt.budget(0.01):
        time.sleep(0.05)
        with pytest.raises(interrupt.OverBudget):
            interrupt.run(lambda: ran.append("third"))
    assert ran == ["first", "second"]
    assert no_timer_left()


class Journal:
    """Fills `software` with the file's bytes and notes each call in a shared journal."""

    NAME = "journal"

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal

    @hookimpl
    def metalake_extract_metadata(self, source: Source) -> Mapping[str, object]:
        with source.open() as handle:
            name = handle.read().decode()
        self.journal.append(f"extract {name}")
        return {"software": name}


async def test_files_that_arrive_in_one_turn_of_the_loop_are_extracted_back_to_back() -> None:
    """Their extractions run one after the other, before any of their uploads goes on."""
    journal: list[str] = []
    registry = ExtractorRegistry([Journal(journal)], trusted=["journal"])

    async def upload(name: str) -> str:
        found = await registry.extract_async(name.encode(), filename=name)
        journal.append(f"on with {name}")
        return str(found.values["software"])

    assert list(await asyncio.gather(upload("a"), upload("b"), upload("c"))) == ["a", "b", "c"]
    assert journal == [
        "extract a",
        "extract b",
        "extract c",
        "on with a",
        "on with b",
        "on with c",
    ]


async def test_a_cancelled_file_is_left_out_of_its_round() -> None:
    journal: list[str] = []
    registry = ExtractorRegistry([Journal(journal)], trusted=["journal"])
    gone = asyncio.ensure_future(registry.extract_async(b"gone", filename="gone"))
    kept = asyncio.ensure_future(registry.extract_async(b"kept", filename="kept"))
    await asyncio.sleep(0)  # both wait for the round
    gone.cancel()
    assert (await kept).values == {"software": "kept"}
    assert gone.cancelled()
    assert journal == ["extract kept"]


def test_a_round_left_behind_by_a_closed_loop_does_not_hold_the_next_one() -> None:
    registry = ExtractorRegistry([Journal([])], trusted=["journal"])
    old = asyncio.new_event_loop()
    try:
        stranded = old.create_task(registry.extract_async(b"stranded", filename="stranded"))
        # One turn: the task starts and waits for its round, which would run at the next one.
        old.call_soon(old.stop)
        old.run_forever()
        assert not stranded.done()
    finally:
        old.close()
    found = asyncio.run(
        asyncio.wait_for(registry.extract_async(b"next", filename="next"), timeout=5)
    )
    assert found.values == {"software": "next"}
