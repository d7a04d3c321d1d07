"""Where a server's CPU goes, by thread, over one small-file run: a profiling aid, not a benchmark
(`make bench` does not run it).

    python -m benchmarks.thread_split                     # one stream, 3,000 files, SQLite
    python -m benchmarks.thread_split call --fill         # one call per file, with fill_metadata
    python -m benchmarks.thread_split stream --bare       # the bare discarding server
    python -m benchmarks.thread_split --backend postgresql    # PostgreSQL + S3 (moto)

Starts one server (`python -m metalake.server` on a fresh data directory, the embedded default
or PostgreSQL + S3 as bench_small_files sets them up, no background image hashing), warms it up
with 200 files, then sends the run's files as bench_small_files does and reads each thread's
utime + stime and context switches from /proc/<pid>/task/*/ before and after. Threads are
grouped by what the kernel calls them: the process's first thread runs the event loop; the
server names its I/O pool `metalake-io` (the catalog's batches, the pack writes, extractor
runners); gRPC names its own (`event_engine`, ...), obstore's runtime `tokio-rt-worker`;
Python's other threads (gRPC's poller) are `python`. CPU (split into user and system time) and
switches are per stored file.

To tell two versions of the code apart, compare the event loop's user time over alternating
runs: the whole server's CPU moves with gRPC's threads and the kernel, and spread about four
times as much as the loop's user time over runs of the same code (docs/performance-log.md,
"Stop 29").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bench_small_files import backend_env, jpegs, per_call, streamed
from tests.serverprocess import ServerProcess

_TICKS = os.sysconf("SC_CLK_TCK")
_LOOP = "event loop (first thread)"


@dataclass(frozen=True)
class _Thread:
    group: str
    user_seconds: float
    system_seconds: float
    switches: int

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.system_seconds


def _threads(pid: int) -> dict[int, _Thread]:
    """Each live thread of `pid`: its group, CPU so far and context switches so far."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        task = Path(f"/proc/{pid}/task/{tid}")
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        switches = sum(
            int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line
        )
        group = _LOOP if int(tid) == pid else name
        threads[int(tid)] = _Thread(
            group, int(fields[11]) / _TICKS, int(fields[12]) / _TICKS, switches
        )
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.thread_split")
    parser.add_argument("mode", nargs="?", choices=["stream", "call"], default="stream")
    parser.add_argument("--fill", action="store_true", help="ask for fill_metadata")
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--bare", action="store_true", help="the bare discarding server")
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="the embedded default, or PostgreSQL + S3 (moto), as small_files runs them",
    )
    options = parser.parse_args()
    run = streamed if options.mode == "stream" else per_call
    with (
        tempfile.TemporaryDirectory(prefix="metalake-threads-") as scratch_name,
        backend_env(options.backend, Path(scratch_name)) as backend,
    ):
        scratch = Path(scratch_name)
        module = "benchmarks.bare_server" if options.bare else "metalake.server"
        server = ServerProcess(
            scratch / "data",
            scratch / "server.log",
            module=module,
            METALAKE_HASH_IMAGES="0",
            **backend,
        )
        with server:
            assert server.process is not None
            pid = server.process.pid
            asyncio.run(run(server.target, jpegs(200, f"warm {uuid.uuid4().hex}"), False, _no_op))
            snapshots: list[dict[int, _Thread]] = []
            files = jpegs(options.files, f"split {uuid.uuid4().hex}")
            rate = asyncio.run(
                run(server.target, files, options.fill, lambda: snapshots.append(_threads(pid)))
            )
    before, after = snapshots
    user: defaultdict[str, float] = defaultdict(float)
    system: defaultdict[str, float] = defaultdict(float)
    switches: defaultdict[str, int] = defaultdict(int)
    for tid, thread in after.items():
        earlier = before.get(tid, _Thread(thread.group, 0.0, 0.0, 0))
        user[thread.group] += thread.user_seconds - earlier.user_seconds
        system[thread.group] += thread.system_seconds - earlier.system_seconds
        switches[thread.group] += thread.switches - earlier.switches
    cpu = {group: user[group] + system[group] for group in user}
    count = len(files)
    print(
        f"{'bare ' if options.bare else ''}{options.mode}"
        f"{', PostgreSQL + S3' if options.backend == 'postgresql' else ''}"
        f"{', fill_metadata' if options.fill else ''}: {count:,} files, {rate:,.0f} files/s, "
        f"server CPU {sum(cpu.values()) * 1000 / count:.3f} ms per file"
    )
    print(
        "| threads | CPU ms per file | user | system | context switches per file |\n"
        "|---|---:|---:|---:|---:|"
    )
    for group in sorted(cpu, key=lambda g: -cpu[g]):
        if cpu[group] or switches[group]:
            print(
                f"| {group} | {cpu[group] * 1000 / count:.3f} | {user[group] * 1000 / count:.3f} "
                f"| {system[group] * 1000 / count:.3f} | {switches[group] / count:.1f} |"
            )


def _no_op() -> None:
    pass


if __name__ == "__main__":
    main()
