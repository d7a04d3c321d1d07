"""The registry's contract: order, merge rules, switches, and extractors that misbehave.

Plugins here are small inline classes registered per test; installed entry points are not loaded
(except where a test says so), so what is installed in the venv does not matter.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pluggy
import pytest

from metalake.extractors import Derived, Source, hookimpl
from metalake.extractors.registry import (
    ExtractorRegistry,
    builtin_plugins,
    parse_timeout,
)
from metalake.extractors.testing import sample_exif, save_with_pillow
from metalake.metadata import FIELDS
from metalake.server.ingest.extract import fill_metadata

# A third party spells the marker itself, without importing metalake's.
third_party_hookimpl = pluggy.HookimplMarker("metalake")


class Fixed:
    """Returns the same values for every file."""

    def __init__(self, name: str, values: Mapping[str, object]) -> None:
        self.NAME = name
        self.values = values
        self.calls: list[frozenset[str]] = []

    @hookimpl
    def metalake_extract_metadata(
        self, source: Source, missing: frozenset[str]
    ) -> Mapping[str, object]:
        self.calls.append(missing)
        return self.values


class Raising:
    NAME = "raising"

    @hookimpl
    def metalake_extract_metadata(self, source: Source) -> Mapping[str, object]:
        raise RuntimeError("boom")


class Hanging:
    NAME = "hanging"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    @hookimpl
    def metalake_extract_metadata(self, source: Source) -> Mapping[str, object]:
        self.started.set()
        self.release.wait(30)
        return {"software": "too late"}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "plain.bin"
    path.write_bytes(b"not an image at all")
    return path


@pytest.fixture
def hanging() -> Iterator[Hanging]:
    plugin = Hanging()
    try:
        yield plugin
    finally:
        plugin.release.set()  # let the abandoned thread finish


def test_first_valid_value_in_order_wins(image: Path) -> None:
    first = Fixed("first", {"software": "one", "manufacturer": "Acme"})
    second = Fixed("second", {"software": "two", "acquired_by": "Bob"})
    registry = ExtractorRegistry([first, second])
    result = registry.extract(image, filename="x.bin")
    assert result.values == {"software": "one", "manufacturer": "Acme", "acquired_by": "Bob"}
    assert result.sources == {"software": "first", "manufacturer": "first", "acquired_by": "second"}
    assert result.errors == []
    # The second extractor is told what is still missing.
    assert second.calls == [frozenset(FIELDS) - {"software", "manufacturer"}]


def test_invalid_values_are_dropped_and_the_next_extractor_fills_them(image: Path) -> None:
    bad = Fixed(
        "bad",
        {
            "latitude": 4294967295.0,
            "resolution_x": float("nan"),
            "resolution_y": 0.0,
            "software": "nul\x00inside",
            "acquired_at": "2020-01-01",  # a string, not a datetime
            "acquired_by": 42,
            "no_such_field": "x",
        },
    )
    good = Fixed(
        "good", {"latitude": 12.5, "resolution_x": 72, "acquired_at": datetime(2020, 1, 1)}
    )
    result = ExtractorRegistry([bad, good]).extract(image)
    assert result.values == {
        "latitude": 12.5,
        "resolution_x": 72.0,
        "acquired_at": datetime(2020, 1, 1),
    }
    assert isinstance(result.values["resolution_x"], float)
    assert set(result.sources.values()) == {"good"}
    assert result.errors == []


def test_only_missing_fields_are_filled(image: Path) -> None:
    plugin = Fixed("p", {"software": "s", "manufacturer": "m"})
    result = ExtractorRegistry([plugin]).extract(image, missing=["manufacturer"])
    assert result.values == {"manufacturer": "m"}
    nothing = ExtractorRegistry([plugin]).extract(image, missing=[])
    assert nothing.values == {}
    assert plugin.calls == [frozenset({"manufacturer"})]


def test_extractors_stop_running_once_everything_is_filled(image: Path) -> None:
    first = Fixed("first", {"software": "s"})
    second = Fixed("second", {"software": "t"})
    ExtractorRegistry([first, second]).extract(image, missing=["software"])
    assert second.calls == []


def test_a_raising_extractor_is_logged_and_skipped(
    image: Path, caplog: pytest.LogCaptureFixture
) -> None:
    after = Fixed("after", {"software": "s"})
    with caplog.at_level(logging.WARNING, logger="metalake.extractors.registry"):
        result = ExtractorRegistry([Raising(), after]).extract(image, filename="upload.jpg")
    assert result.values == {"software": "s"}
    assert result.errors == [("raising", "RuntimeError: boom")]
    assert "raising" in caplog.text
    assert "upload.jpg" in caplog.text


def test_a_hanging_extractor_times_out_and_the_others_still_count(
    image: Path, hanging: Hanging, caplog: pytest.LogCaptureFixture
) -> None:
    before = Fixed("before", {"manufacturer": "m"})
    after = Fixed("after", {"software": "s"})
    registry = ExtractorRegistry([before, hanging, after], timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="metalake.extractors.registry"):
        result = registry.extract(image, filename="slow.jpg")
    assert result.values == {"manufacturer": "m", "software": "s"}
    assert result.sources == {"manufacturer": "before", "software": "after"}
    assert [name for name, _ in result.errors] == ["hanging"]
    assert "timed out" in result.errors[0][1]
    assert "slow.jpg" in caplog.text


def test_threads_stuck_in_one_extractor_are_bounded(image: Path, hanging: Hanging) -> None:
    registry = ExtractorRegistry([hanging], timeout=0.05)
    messages = [registry.extract(image).errors[0][1] for _ in range(6)]
    assert all("timed out" in message for message in messages[:4])
    # Past the cap the extractor is skipped without starting yet another thread.
    assert all("still running" in message for message in messages[4:])
    hanging.release.set()


async def test_on_an_event_loop_a_hanging_extractor_times_out_and_the_others_still_count(
    hanging: Hanging, caplog: pytest.LogCaptureFixture
) -> None:
    before = Fixed("before", {"manufacturer": "m"})
    after = Fixed("after", {"software": "s"})
    registry = ExtractorRegistry([before, hanging, after], timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="metalake.extractors.registry"):
        started = time.monotonic()
        result = await registry.extract_async(b"not an image at all", filename="slow.jpg")
    assert time.monotonic() - started < 5
    assert result.values == {"manufacturer": "m", "software": "s"}
    assert result.sources == {"manufacturer": "before", "software": "after"}
    assert [name for name, _ in result.errors] == ["hanging"]
    assert "timed out" in result.errors[0][1]
    assert "slow.jpg" in caplog.text


async def test_on_an_event_loop_results_match_the_blocking_call(tmp_path: Path) -> None:
    path = save_with_pillow(tmp_path / "a.jpg", sample_exif())
    registry = ExtractorRegistry(builtin_plugins())
    expected = registry.extract(path)
    for content in (path, path.read_bytes()):
        found = await registry.extract_async(content, filename="a.jpg")
        assert (found.values, found.sources, found.errors) == (
            expected.values,
            expected.sources,
            expected.errors,
        )
    unlimited = ExtractorRegistry(builtin_plugins(), timeout=None)
    assert (await unlimited.extract_async(path)).values == expected.values


async def test_on_an_event_loop_stuck_threads_are_bounded(image: Path, hanging: Hanging) -> None:
    registry = ExtractorRegistry([hanging], timeout=0.05)
    messages = [(await registry.extract_async(image)).errors[0][1] for _ in range(6)]
    assert all("timed out" in message for message in messages[:4])
    assert all("still running" in message for message in messages[4:])
    hanging.release.set()


async def test_on_an_event_loop_the_chains_thread_is_idle_before_the_loop_resumes() -> None:
    # The thread wakes the loop as the last thing it does: the loop never finds it still busy,
    # so files extracted one after another all run on one thread.
    registry = ExtractorRegistry([Fixed("fixed", {"software": "s"})])
    workers = []
    for _ in range(5):
        found = await registry.extract_async(b"not an image", filename="a.bin")
        assert found.values == {"software": "s"}
        workers.append(list(registry._runner._idle))
    assert len(workers[0]) == 1
    assert all(idle == workers[0] for idle in workers)


async def test_on_an_event_loop_an_overrun_call_that_returns_frees_its_extractor(
    image: Path, hanging: Hanging
) -> None:
    after = Fixed("after", {"manufacturer": "m"})
    registry = ExtractorRegistry([hanging, after], timeout=0.05)
    found = await registry.extract_async(image)
    assert found.values == {"manufacturer": "m"}
    assert "timed out" in found.errors[0][1]
    assert registry._runner.stuck == {"hanging": 1}
    hanging.release.set()
    # Released, the abandoned thread takes itself off the count, reading its chain without a lock.
    for _ in range(500):
        if registry._runner.stuck == {"hanging": 0}:
            break
        await asyncio.sleep(0.01)
    assert registry._runner.stuck == {"hanging": 0}


async def test_a_cancelled_extraction_stops_after_the_current_call(
    image: Path, hanging: Hanging
) -> None:
    after = Fixed("after", {"software": "s"})
    registry = ExtractorRegistry([hanging, after], timeout=30)
    task = asyncio.create_task(registry.extract_async(image))
    await asyncio.to_thread(hanging.started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    hanging.release.set()
    await asyncio.sleep(0.2)
    assert after.calls == []
    # A cancelled call is not a stuck one: the extractor is not held against later files.
    hanging.release.clear()
    assert registry._runner.stuck.get("hanging", 0) == 0


async def test_on_an_event_loop_a_file_that_cannot_be_opened_raises(tmp_path: Path) -> None:
    registry = ExtractorRegistry([Fixed("fixed", {"software": "s"})])
    with pytest.raises(FileNotFoundError):
        await registry.extract_async(tmp_path / "gone.jpg")


async def test_fill_metadata_gives_up_at_its_time_limit_and_keeps_the_clients_values(
    hanging: Hanging,
) -> None:
    # Without a per-extractor limit, only fill_metadata's own backstop ends the wait.
    registry = ExtractorRegistry([hanging], timeout=None)
    started = time.monotonic()
    filled = await fill_metadata(
        registry, b"not an image", filename="a.jpg", given={"software": "s"}, time_limit=0.2
    )
    assert time.monotonic() - started < 5
    assert filled.metadata == {"software": "s"}
    assert filled.sources == {"software": "client"}


def test_non_mapping_results_are_errors_not_crashes(image: Path) -> None:
    class Weird:
        NAME = "weird"

        @hookimpl
        def metalake_extract_metadata(self) -> object:
            return ["software", "x"]

    result = ExtractorRegistry([Weird()]).extract(image)
    assert result.values == {}
    assert result.errors == [("weird", "returned list, not a mapping")]


def test_order_is_registration_order_with_tryfirst_and_trylast(image: Path) -> None:
    class Early:
        NAME = "early"

        @third_party_hookimpl(tryfirst=True)
        def metalake_extract_metadata(self) -> Mapping[str, object]:
            return {"software": "early"}

    class Late:
        NAME = "late"

        @third_party_hookimpl(trylast=True)
        def metalake_extract_metadata(self) -> Mapping[str, object]:
            return {"software": "late", "manufacturer": "late"}

    registry = ExtractorRegistry(
        [Late(), Fixed("a", {}), Fixed("b", {"manufacturer": "b"}), Early()]
    )
    assert [(info.name, info.order) for info in registry.describe()] == [
        ("early", 1),
        ("a", 2),
        ("b", 3),
        ("late", 4),
    ]
    result = registry.extract(image)
    assert result.sources == {"software": "early", "manufacturer": "b"}


def test_an_implementation_matching_no_hook_is_rejected() -> None:
    class Typo:
        NAME = "typo"

        @hookimpl
        def metalake_extract_metadta(self) -> None:
            return None

    with pytest.raises(pluggy.PluginValidationError):
        ExtractorRegistry([Typo()])


def test_builtins_are_ordinary_plugins_in_order() -> None:
    registry = ExtractorRegistry(builtin_plugins())
    described = registry.describe()
    assert [info.name for info in described] == ["pillow", "exifread", "gps", "xmp"]
    assert [info.order for info in described] == [1, 2, 3, 4]
    assert all(info.version for info in described)


def test_environment_allow_list(image: Path) -> None:
    registry = ExtractorRegistry.from_environment({"METALAKE_PLUGINS": "pillow, gps"})
    assert registry.names == ["pillow", "gps"]
    assert ExtractorRegistry.from_environment({"METALAKE_PLUGINS": ""}).names == []


def test_environment_block_list() -> None:
    names = ExtractorRegistry.from_environment({"METALAKE_DISABLE_PLUGINS": "exifread"}).names
    assert names[:3] == ["pillow", "gps", "xmp"]
    assert "exifread" not in names


def test_environment_timeout() -> None:
    assert ExtractorRegistry.from_environment({"METALAKE_EXTRACT_TIMEOUT": "2.5"}).timeout == 2.5
    assert parse_timeout("0") is None
    assert parse_timeout(None) == 5.0
    with pytest.raises(ValueError, match="METALAKE_EXTRACT_TIMEOUT"):
        parse_timeout("-1")


def test_allow_and_block_lists_in_the_constructor() -> None:
    plugins = [Fixed("a", {}), Fixed("b", {}), Fixed("c", {})]
    assert ExtractorRegistry(plugins, allow=["a", "c"], block=["c"]).names == ["a"]


def test_entry_points_load_after_builtins_and_broken_ones_are_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = type("module", (), {})()  # a namespace standing in for an imported plugin module

    @hookimpl
    def metalake_extract_metadata() -> Mapping[str, object]:
        return {}

    module.metalake_extract_metadata = metalake_extract_metadata
    points = [
        importlib.metadata.EntryPoint("zzz", "tests.test_registry:ZZZ", "metalake.extractors"),
        importlib.metadata.EntryPoint("broken", "no_such_module_xyz", "metalake.extractors"),
        importlib.metadata.EntryPoint("blocked", "no_such_module_either", "metalake.extractors"),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: points)
    monkeypatch.setattr("tests.test_registry.ZZZ", module, raising=False)
    registry = ExtractorRegistry.from_environment({"METALAKE_DISABLE_PLUGINS": "blocked"})
    assert registry.names == ["pillow", "exifread", "gps", "xmp", "zzz"]
    assert [name for name, _ in registry.load_errors] == ["broken"]


def test_concurrent_extractions_agree(tmp_path: Path) -> None:
    path = save_with_pillow(tmp_path / "a.jpg", sample_exif())
    registry = ExtractorRegistry(builtin_plugins())
    expected = registry.extract(path).values
    results: list[object] = []

    def work() -> None:
        for _ in range(20):
            results.append(registry.extract(path).values)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 160
    assert all(result == expected for result in results)


def test_new_style_wrappers_run_around_every_extractor_and_may_change_results(
    image: Path,
) -> None:
    seen: list[str] = []

    class Upper:
        NAME = "upper"

        @hookimpl(wrapper=True)
        def metalake_extract_metadata(
            self, source: Source
        ) -> Generator[None, list[Mapping[str, object]], list[Mapping[str, object]]]:
            seen.append("before")
            results = yield
            seen.append("after")
            return [{k: str(v).upper() for k, v in result.items()} for result in results]

    first = Fixed("first", {"software": "one"})
    second = Fixed("second", {"manufacturer": "acme"})
    registry = ExtractorRegistry([first, Upper(), second])
    assert registry.names == ["first", "second"]
    assert [(i.name, i.kind, i.order) for i in registry.describe()] == [
        ("upper", "wrapper", 0),
        ("first", "extractor", 1),
        ("second", "extractor", 2),
    ]
    result = registry.extract(image)
    assert result.values == {"software": "ONE", "manufacturer": "ACME"}
    # Provenance stays with the extractor the wrapper wrapped.
    assert result.sources == {"software": "first", "manufacturer": "second"}
    assert seen == ["before", "after", "before", "after"]
    assert result.errors == []


def test_old_style_hookwrappers_are_honoured(image: Path) -> None:
    class Counting:
        NAME = "counting"
        calls = 0

        @third_party_hookimpl(hookwrapper=True)
        def metalake_extract_metadata(self) -> Generator[None, pluggy.Result[Any], None]:
            outcome = yield
            Counting.calls += 1
            outcome.force_result([{"acquired_by": "wrapped"}, *outcome.get_result()])

    result = ExtractorRegistry([Fixed("a", {"software": "s"}), Counting()]).extract(image)
    assert Counting.calls == 1
    assert result.values == {"acquired_by": "wrapped", "software": "s"}
    assert result.sources == {"acquired_by": "a", "software": "a"}


def test_a_wrapper_that_breaks_a_call_is_reported_for_that_call(image: Path) -> None:
    class Broken:
        NAME = "broken"

        @hookimpl(wrapper=True)
        def metalake_extract_metadata(self) -> Generator[None, object, object]:
            yield
            return "not a list"

    result = ExtractorRegistry([Fixed("a", {"software": "s"}), Broken()]).extract(image)
    assert result.values == {}
    assert result.errors == [("a", "a wrapper returned str, not a list of results")]


def test_derived_values_say_how_in_their_source(image: Path) -> None:
    when = datetime(2020, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    plugin = Fixed("clock", {"acquired_at": Derived(when, "gps-clock"), "software": "s"})
    result = ExtractorRegistry([plugin]).extract(image)
    assert result.values["acquired_at"] == when
    assert result.sources == {"acquired_at": "clock+gps-clock", "software": "clock"}


def test_disabling_pillow_runs_no_pillow_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from metalake.extractors import pillow_exif

    def refuse(source: Source) -> None:
        raise AssertionError("Pillow's reading ran although `pillow` is disabled")

    monkeypatch.setattr(pillow_exif, "read_directories", refuse)
    monkeypatch.setattr(pillow_exif, "_read", refuse)
    path = save_with_pillow(tmp_path / "a.jpg", sample_exif())
    registry = ExtractorRegistry.from_environment({"METALAKE_DISABLE_PLUGINS": "pillow"})
    result = registry.extract(path)
    assert result.errors == []
    assert result.sources["manufacturer"] == "exifread"
    assert result.sources["latitude"] == "gps"
