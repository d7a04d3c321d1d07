"""Buckets registered in place: objects per second and bytes read per object, against moto.

moto's S3 server runs on loopback; metalake runs in a process of its own, and its CPU time per
object is read from /proc for that process only. Three imports of the same prefix, measured in
the same run: with fill_metadata (one ranged GET per object), without it (the listing and the
catalog writes only: the baseline), and a rerun that finds every object unchanged.

    METALAKE_BENCH_SCALE=0.5 python -m benchmarks import
"""

from __future__ import annotations

import io
import logging
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import grpc
from moto.server import ThreadedMotoServer
from PIL import Image

from metalake.extractors.testing import sample_exif
from metalake.v1 import datalake_pb2 as pb
from metalake.v1 import datalake_pb2_grpc as pb_grpc
from tests.serverprocess import ServerProcess

COUNT = int(1000 * float(os.environ.get("METALAKE_BENCH_SCALE", "1")))
OBJECT_SIZE = 400_000  # a JPEG with EXIF, then padding: a typical camera file's order of size


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _jpeg(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (index % 256, 80, 160)).save(buffer, "JPEG", exif=sample_exif())
    data = buffer.getvalue()
    return data + bytes(OBJECT_SIZE - len(data))


def main() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=bucket)
    for i in range(COUNT):
        s3.put_object(Bucket=bucket, Key=f"photos/{i:06d}.jpg", Body=_jpeg(i))
    print(f"{COUNT} objects of {OBJECT_SIZE:,} bytes in moto; machine shared, timings noisy")
    print("| import | objects/s | bytes read/object | server CPU ms/object |")
    print("|---|---|---|---|")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for fill, prefix in ((False, "photos/"), (True, "photos/")):
                name = "fill" if fill else "plain"
                server = ServerProcess(Path(scratch) / name, Path(scratch) / f"{name}.log", **env)
                with server, grpc.insecure_channel(server.target) as channel:
                    stub = pb_grpc.DatalakeServiceStub(channel)
                    assert server.process is not None
                    for label in ("first", "rerun"):
                        request = pb.ImportObjectsRequest(
                            source=f"s3://{bucket}/{prefix}", fill_metadata=fill
                        )
                        cpu = _cpu_seconds(server.process.pid)
                        started = time.perf_counter()
                        report = stub.ImportObjects(request, timeout=3600)
                        elapsed = time.perf_counter() - started
                        cpu = _cpu_seconds(server.process.pid) - cpu
                        assert report.listed == COUNT, report
                        what = f"{label}, fill_metadata={fill}"
                        print(
                            f"| {what} | {COUNT / elapsed:.0f} | "
                            f"{report.bytes_read / COUNT:,.0f} | {cpu / COUNT * 1000:.2f} |",
                            flush=True,
                        )
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
