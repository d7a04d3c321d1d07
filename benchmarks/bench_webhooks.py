"""Uploads while webhooks deliver: does a receiver that is fast, failing or stuck slow them?

Each scenario is a fresh server in a process of its own, the same small JPEGs uploaded the same
way (one call per file, several clients); the baseline is a server with no webhook, measured in
the same run. Beside files/s, the server's CPU per upload (from /proc, the server process only):
delivery work shows there even when throughput hides it. The receiver runs in this process on
loopback: "fast" answers 200 at once, "failing" answers 500 (retried every 0.1 s, as hard as
retries get), "stuck" holds every POST for 30 s (the delivery timeout is 10 s).

    METALAKE_BENCH_SCALE=0.2 python -m benchmarks webhooks     # 100 files per scenario
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks.bench_upload import per_call, small_jpegs
from metalake import Client
from tests.serverprocess import ServerProcess

SCALE = float(os.environ.get("METALAKE_BENCH_SCALE", "1"))
FILES = max(50, int(500 * SCALE))
_TICKS = os.sysconf("SC_CLK_TCK")


class _Receiver:
    def __init__(self, answer: int, hold: float) -> None:
        self.count = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                with lock:
                    outer.count += 1
                if hold:
                    threading.Event().wait(hold)
                self.send_response(answer)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


ROUNDS = 3
SETTLE = 3.0  # seconds after the last round, so deferred work (hashing, deliveries) is counted


def main() -> None:
    files = small_jpegs(FILES)
    print(
        f"{FILES} JPEGs per round, one UploadData each, {ROUNDS} rounds alternating between the "
        "servers (best round counts). Server CPU from /proc (the server process only), over the "
        f"rounds and {SETTLE:g} s after, per upload: it includes the background near-duplicate "
        "hashing, the same in every scenario but the second. Shared 2-core machine: compare within "
        "the table.\n"
    )
    scenarios: list[tuple[str, _Receiver | None]] = [
        ("no webhook (baseline)", None),
        ("no webhook, METALAKE_HASH_IMAGES=false", None),
        ("fast (200 at once)", _Receiver(200, 0.0)),
        ("failing (500, retried every 0.1 s+)", _Receiver(500, 0.0)),
        ("stuck (holds every POST 30 s)", _Receiver(200, 30.0)),
    ]
    env = {"METALAKE_WEBHOOK_RETRY_BASE": "0.1", "METALAKE_WEBHOOK_TIMEOUT": "10"}
    with tempfile.TemporaryDirectory(prefix="metalake-bench-") as scratch_name:
        scratch = Path(scratch_name)
        servers = [
            ServerProcess(
                scratch / f"s{i}",
                scratch / f"s{i}.log",
                **env,
                **({"METALAKE_HASH_IMAGES": "false"} if "HASH_IMAGES" in name else {}),
            ).start()
            for i, (name, _) in enumerate(scenarios)
        ]
        try:
            for server, (_, receiver) in zip(servers, scenarios, strict=True):
                if receiver is not None:
                    with Client(server.target) as client:
                        client.get_datalake().add_webhook(receiver.url)
            started = [_cpu_seconds(_pid(server)) for server in servers]
            best = [0.0] * len(servers)
            for _ in range(ROUNDS):
                for index, server in enumerate(servers):
                    rate = asyncio.run(per_call(server.target, files, False))
                    best[index] = max(best[index], rate)
            threading.Event().wait(SETTLE)
            cpu = [
                (_cpu_seconds(_pid(server)) - start) * 1000 / (ROUNDS * FILES)
                for server, start in zip(servers, started, strict=True)
            ]
        finally:
            for server in servers:
                server.__exit__(None, None, None)
            for _, receiver in scenarios:
                if receiver is not None:
                    receiver.close()
    print("| receiver | files/s | vs no webhook | server CPU ms/upload | POSTs received |")
    print("|---|---:|---:|---:|---:|")
    for (name, receiver), rate, per_upload in zip(scenarios, best, cpu, strict=True):
        posts = f"{receiver.count:,}" if receiver is not None else ""
        print(f"| {name} | {rate:,.0f} | {rate / best[0]:.2f} | {per_upload:.2f} | {posts} |")


def _pid(server: ServerProcess) -> int:
    assert server.process is not None
    return server.process.pid
