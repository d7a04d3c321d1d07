"""A metalake server in a process of its own, for tests that signal or kill it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_SERVING = re.compile(r"serving on [\d.]+:(\d+)")


class ServerProcess:
    """`python -m metalake.server` on a free port; `target` is its address once started."""

    def __init__(
        self,
        data_dir: Path,
        log: Path,
        *,
        module: str = "metalake.server",
        args: Sequence[str] = (),
        **env: str,
    ) -> None:
        self.data_dir = data_dir
        self.module = module
        self.args = list(args)
        self.log = log
        self.env = {
            **os.environ,
            "METALAKE_DATA_DIR": str(data_dir),
            "METALAKE_LISTEN": "127.0.0.1:0",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.target = ""

    def start(self, timeout: float = 60) -> ServerProcess:
        with self.log.open("ab") as log:
            log.write(b"--- start\n")
            offset = log.tell()
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                env=self.env,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log.open("rb") as log:
                log.seek(offset)
                found = _SERVING.search(log.read().decode(errors="replace"))
            if found:
                self.target = f"127.0.0.1:{found.group(1)}"
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"server did not start; its log:\n{self.log.read_text()}")

    def signal(self, number: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def peak_memory(self) -> int:
        """The process's peak resident memory so far, in bytes (VmHWM)."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kilobytes = next(
            line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")
        )
        return int(kilobytes) * 1024

    def pids(self) -> list[int]:
        """The server's process and its live children (a supervisor's workers)."""
        assert self.process is not None
        return [self.process.pid, *_children(self.process.pid)]

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server has used so far: its own process, its live
        children, and the children it has already reaped (a replaced worker)."""
        assert self.process is not None
        total = _cpu_ticks(self.process.pid, reaped_children=True)
        total += sum(_cpu_ticks(child) for child in _children(self.process.pid))
        return total / os.sysconf("SC_CLK_TCK")

    def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def health(self) -> int:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status: int = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            return status

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def command_line(pid: int) -> bytes:
    """A process's command line, NUL-separated; empty once it has exited.

    A process on its way out answers reads of /proc/PID/cmdline with ESRCH
    (ProcessLookupError) before its directory goes (FileNotFoundError).
    """
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


def _children(pid: int) -> list[int]:
    # /proc/PID/task/*/children needs a kernel option that is often off: scan parents instead.
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def _cpu_ticks(pid: int, *, reaped_children: bool = False) -> int:
    """utime + stime of a process (and cutime + cstime of its reaped children), in clock ticks.

    A process that has just exited counts as 0: its time moves to its parent's cutime.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return utime + stime + (cutime + cstime if reaped_children else 0)
