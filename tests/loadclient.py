"""One client process of the load test (tests/test_load.py).

    python -m tests.loadclient TARGET PROCESS FILES

Connects, prints "ready", waits for a line on stdin (so that every process streams at the same
moment), then uploads FILES files generated from PROCESS: the even ones one UploadData call each,
the odd ones over one UploadDataStream, both at once. It prints one JSON line per acknowledged
file ({"name", "sha256", "size", "id", "via"}), then {"retries": {...}}, and exits non-zero if
any file could not be stored.

Only the generated stubs are used, not the SDK: this is a second, independent client, and it
spells out the retry rule under test. RESOURCE_EXHAUSTED with a google.rpc.RetryInfo means "come
back after retry_delay"; without one the limit is permanent and the upload fails. Every file
keeps its request_id across retries, so a retry whose first try was in fact stored stores
nothing new.
"""

from __future__ import annotations

import hashlib
import json
import queue
import random
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc

CHUNK = 256 * 1024  # the SDK's chunk size
# Sizes cycle through these: below one chunk, one chunk and a bit, several chunks.
SIZES = (3_000, 40_000, 300_000, 700_000)
WINDOW = 4  # files of the stream in flight
# Everything must be stored within this; the test's own limit is above it.
DEADLINE = 50.0
# A FileError has no RetryInfo (the contract gives it none): this stands in for it. It is the
# delay the server puts in RetryInfo on UploadData.
STREAM_RETRY_DELAY = 1.0


@dataclass(frozen=True)
class File:
    name: str
    content: bytes
    request_id: str


@dataclass
class Retries:
    call: int = 0
    stream: int = 0


def files_of(process: int, count: int) -> list[File]:
    """Distinct, reproducible contents: random bytes seeded by process and index."""
    return [
        File(
            name=f"p{process:03d}-f{index:02d}.bin",
            content=random.Random(f"{process}/{index}").randbytes(SIZES[index % len(SIZES)]),
            request_id=str(uuid.uuid4()),  # chosen once per file, reused on every retry
        )
        for index in range(count)
    ]


def retry_delay(error: grpc.RpcError) -> float | None:
    """Seconds to wait before retrying, if the server asked for a retry; None: do not retry."""
    if not isinstance(error, grpc.Call) or error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else []:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None  # a permanent limit (a quota, the file size): retrying cannot help


def _backoff(delay: float) -> float:
    # At least what the server asked, plus jitter so the refused clients do not all come back
    # at the same instant and get refused together again.
    return delay * random.uniform(1.0, 1.5)


def _call_requests(file: File) -> Iterator[pb.UploadDataRequest]:
    yield pb.UploadDataRequest(
        header=pb.UploadDataHeader(filename=file.name, request_id=file.request_id)
    )
    for start in range(0, len(file.content), CHUNK):
        yield pb.UploadDataRequest(chunk=file.content[start : start + CHUNK])


def upload_calls(
    stub: pb_grpc.DatalakeServiceStub, files: list[File], retries: Retries, deadline: float
) -> dict[str, pb.Data]:
    """One UploadData call per file, one after the other."""
    stored: dict[str, pb.Data] = {}
    for file in files:
        while True:
            try:
                response = stub.UploadData(
                    _call_requests(file), timeout=max(1.0, deadline - time.monotonic())
                )
            except grpc.RpcError as error:
                delay = retry_delay(error)
                if delay is None or time.monotonic() + delay > deadline:
                    raise
                retries.call += 1
                time.sleep(_backoff(delay))
                continue
            stored[file.name] = response.data
            break
    return stored


def upload_stream(
    stub: pb_grpc.DatalakeServiceStub, files: list[File], retries: Retries, deadline: float
) -> dict[str, pb.Data]:
    """Every file over UploadDataStream, WINDOW in flight; refused files are sent again."""
    stored: dict[str, pb.Data] = {}
    while len(stored) < len(files):
        # A new stream (the first, or after the server ended one with a retryable status)
        # carries what is not stored yet, with the same request ids.
        try:
            stored |= _one_stream(stub, [f for f in files if f.name not in stored], retries)
        except grpc.RpcError as error:
            delay = retry_delay(error)
            if delay is None or time.monotonic() + delay > deadline:
                raise
            retries.stream += 1
            time.sleep(_backoff(delay))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(files) - len(stored)} files not stored in time")
    return stored


def _one_stream(
    stub: pb_grpc.DatalakeServiceStub, files: list[File], retries: Retries
) -> dict[str, pb.Data]:
    ready: queue.Queue[File | None] = queue.Queue()  # files to send; None ends the stream
    for file in files:
        ready.put(file)
    window = threading.Semaphore(WINDOW)
    sent: list[File] = []  # file_index -> file: answers come in the order headers went out

    def requests() -> Iterator[pb.UploadDataStreamRequest]:
        while (file := ready.get()) is not None:
            window.acquire()
            sent.append(file)  # before the header goes out, so before its answer can arrive
            yield pb.UploadDataStreamRequest(
                header=pb.UploadDataHeader(filename=file.name, request_id=file.request_id)
            )
            for start in range(0, len(file.content), CHUNK):
                yield pb.UploadDataStreamRequest(chunk=file.content[start : start + CHUNK])
            yield pb.UploadDataStreamRequest(finish=True)

    stored: dict[str, pb.Data] = {}
    timers: list[threading.Timer] = []
    answers = stub.UploadDataStream(requests(), timeout=DEADLINE)
    try:
        for answer in answers:
            file = sent[answer.file_index]
            window.release()
            if answer.HasField("data"):
                stored[file.name] = answer.data
            elif answer.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]:
                # One refused file does not end the stream: send it again on this one, later.
                retries.stream += 1
                timer = threading.Timer(_backoff(STREAM_RETRY_DELAY), ready.put, args=(file,))
                timer.start()
                timers.append(timer)
            else:
                raise RuntimeError(f"{file.name}: {answer.error.code} {answer.error.message}")
            if len(stored) == len(files):
                ready.put(None)  # all stored: half-close, and the server ends the stream
    finally:
        for timer in timers:
            timer.cancel()
        answers.cancel()  # type: ignore[no-untyped-call]  # a no-op once the stream has ended
        # If we leave early, unblock the request thread wherever it waits.
        ready.put(None)
        for _ in range(WINDOW):
            window.release()
    return stored


def main(target: str, process: int, count: int) -> int:
    files = files_of(process, count)
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        print("ready", flush=True)
        sys.stdin.readline()  # "go": every process is connected
        stub = pb_grpc.DatalakeServiceStub(channel)
        retries = Retries()
        deadline = time.monotonic() + DEADLINE
        results: dict[str, dict[str, pb.Data]] = {}

        def run(via: str) -> None:
            upload = upload_calls if via == "call" else upload_stream
            mine = files[0::2] if via == "call" else files[1::2]
            results[via] = upload(stub, mine, retries, deadline)

        # Both kinds at once: two concurrent streams from this process.
        threads = [threading.Thread(target=run, args=(via,)) for via in ("call", "stream")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    by_name = {file.name: file for file in files}
    for via, stored in results.items():
        for name, data in stored.items():
            line = {
                "name": name,
                "sha256": hashlib.sha256(by_name[name].content).hexdigest(),
                "size": len(by_name[name].content),
                "id": data.id,
                "via": via,
            }
            print(json.dumps(line))
    print(json.dumps({"retries": {"call": retries.call, "stream": retries.stream}}), flush=True)
    # A thread that raised left its result out (its traceback is on stderr): fail the process.
    return 0 if sum(map(len, results.values())) == count else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
