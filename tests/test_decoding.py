"""Clients' images are decoded in processes of their own: a decoder that crashes costs one file
its preview or hash, never the server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from metalake.server import thumbnails
from metalake.server.decoding import DecoderCrashed, Decoders
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests import imagesamples
from tests.conftest import ServerHandle
from tests.serverprocess import ServerProcess, command_line
from tests.test_service import upload

POISON = "poison"


def crash() -> None:
    """What a decoder's segmentation fault does to its process."""
    os.kill(os.getpid(), signal.SIGSEGV)


def crashing_render(path: Path, size: int, *, filename: str = "") -> thumbnails.Preview | None:
    """thumbnails.render, but a file named POISON crashes the decoder process, as a crafted
    file meeting a decoder's bug would. Module-level, so that decoder processes import it."""
    if POISON in filename:
        crash()
    return thumbnails.render(path, size, filename=filename)


def square(value: int) -> int:
    return value * value


async def test_a_crash_costs_its_own_work_and_the_pool_is_replaced() -> None:
    decoders = Decoders(processes=2)
    try:
        assert await decoders.run(square, 7) == 49
        with pytest.raises(DecoderCrashed):
            await decoders.run(crash)
        # Work beside a crash fails with it in concurrent.futures; here it is tried again.
        results = await asyncio.gather(
            decoders.run(crash), decoders.run(square, 3), return_exceptions=True
        )
        assert isinstance(results[0], DecoderCrashed)
        assert results[1] == 9
        assert await decoders.run(square, 5) == 25
        with pytest.raises(ZeroDivisionError):  # the work's own errors come back as they are
            await decoders.run(divmod, 1, 0)
    finally:
        decoders.close()


def test_a_file_that_crashes_its_decoder_gets_no_preview_and_the_server_goes_on(
    running_server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(thumbnails, "render", crashing_render)
    photo = imagesamples.encoded(imagesamples.landscape(), "PNG")
    with grpc.insecure_channel(running_server.target) as channel:
        stub = pb_grpc.DatalakeServiceStub(channel)
        poison = upload(stub, photo + b"1", filename=f"{POISON}.png")
        good = [upload(stub, photo + bytes([i]), filename=f"good{i}.png") for i in range(3)]

        def preview(data_id: str) -> pb.GetThumbnailResponse | grpc.StatusCode:
            try:
                response: pb.GetThumbnailResponse = stub.GetThumbnail(
                    pb.GetThumbnailRequest(id=data_id)
                )
                return response
            except grpc.RpcError as error:
                return error.code()

        # All at once: the good files' previews share the pool with the crashing one.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(preview, [poison.id, *(g.id for g in good)]))
        assert answers[0] == grpc.StatusCode.NOT_FOUND  # no preview, recorded as such
        assert all(isinstance(a, pb.GetThumbnailResponse) and a.width for a in answers[1:])
        assert preview(poison.id) == grpc.StatusCode.NOT_FOUND  # not tried again
        # The server serves on, and its item is whole.
        assert stub.GetData(pb.GetDataRequest(id=poison.id)).data.sha256 == poison.sha256


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited


async def test_idle_decoder_processes_stop_and_start_again_when_needed() -> None:
    decoders = Decoders(processes=1, idle_after=0.2)
    try:
        first = await decoders.run(os.getpid)
        assert first != os.getpid()
        assert _alive(first)
        for _ in range(100):  # they hold tens of MB each: gone soon after the last work
            await asyncio.sleep(0.05)
            if not _alive(first):
                break
        assert not _alive(first)
        second = await decoders.run(os.getpid)
        assert second != first
        assert _alive(second)
    finally:
        decoders.close()


def warn_and_log() -> None:
    """What Pillow does on a client's odd file: a Python warning, and a line of its logger."""
    import logging
    import warnings

    warnings.warn_explicit("Truncated File Read", UserWarning, "/x/PIL/TiffImagePlugin.py", 1)
    logging.getLogger("PIL.TiffImagePlugin").error("More samples per pixel than can be decoded")
    logging.getLogger("metalake.server.thumbnails").warning("a line of the server's own")


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_a_decoder_process_logs_json_lines_as_the_server_does(
    level: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Decoder processes inherit the server's environment and stderr: they log as it does.
    monkeypatch.setenv("METALAKE_LOG_LEVEL", level)
    monkeypatch.setenv("METALAKE_LOG_FORMAT", "json")
    decoders = Decoders(processes=1)
    try:
        await decoders.run(warn_and_log)
    finally:
        decoders.close()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line JSON, none raw
    loggers = sorted(record["logger"] for record in records)
    if level == "debug":
        assert loggers == ["metalake.lib.PIL", "metalake.lib.PIL.TiffImagePlugin", THUMBNAILS]
    else:
        assert loggers == [THUMBNAILS]  # Pillow's, about a client's file: at debug only


THUMBNAILS = "metalake.server.thumbnails"


def test_decoder_processes_end_with_a_server_that_is_killed(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "data", tmp_path / "server.log") as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.DatalakeServiceStub(channel)
            item = upload(stub, imagesamples.encoded(imagesamples.landscape(), "PNG"), "a.png")
            assert stub.GetThumbnail(pb.GetThumbnailRequest(id=item.id)).width
        decoders = [pid for pid in server.pids()[1:] if b"spawn_main" in command_line(pid)]
        assert decoders  # the preview was made in one
        server.signal(signal.SIGKILL)
        server.wait()
    for _ in range(200):  # a decoder process left behind would hold its memory for nothing
        if not any(_alive(pid) for pid in decoders):
            break
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in decoders)
