"""Start-up time of the `metalake` command beside bare Python (`python -c pass`), same run.

What a device pays before any work: `metalake --help`, `metalake --version` and a client
command's argument check (`metalake ls --help`), each as the difference over starting Python
itself. The aim is under 0.15 s over bare Python. CPU time (user + system, from the children's
rusage) is given beside wall time and judges the aim: on a shared machine wall time also counts
the wait for a free core. The last row is what every command imported before the server-side
commands were declared without importing the server.
Run: `.venv/bin/python -m benchmarks.bench_startup` (or `make bench`).
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROUNDS = 15
TARGET_SECONDS = 0.15


def commands() -> dict[str, list[str]]:
    script = str(Path(sys.executable).parent / "metalake")
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "metalake --help": [script, "--help"],
        "metalake --version": [script, "--version"],
        "metalake ls --help": [script, "ls", "--help"],
        "python -c 'import metalake.plugin'": [sys.executable, "-c", "import metalake.plugin"],
        # What every command imported before the server commands were declared lazily.
        "imports of the old --help (server admin + extractors)": [
            sys.executable,
            "-c",
            "import metalake.client, metalake.server.admin, metalake.extractors.cli",
        ],
    }


def measure_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    runs = commands()
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    for argv in runs.values():  # warm the page cache and the .pyc files
        measure_once(argv)
    for _ in range(ROUNDS):  # interleaved, so that a busy moment hits every command alike
        for name, argv in runs.items():
            wall, cpu = measure_once(argv)
            walls[name].append(wall)
            cpus[name].append(cpu)
    base_wall = statistics.median(walls["python -c pass"])
    base_cpu = statistics.median(cpus["python -c pass"])
    print(f"median of {ROUNDS} runs each, interleaved; aim: < {TARGET_SECONDS:.2f} s over bare")
    print()
    print("| command | wall ms | CPU ms | wall over bare Python | CPU over bare Python |")
    print("|---|---:|---:|---:|---:|")
    for name in runs:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        over = "" if name == "python -c pass" else f"{(wall - base_wall) * 1000:+.0f} ms"
        over_cpu = "" if name == "python -c pass" else f"{(cpu - base_cpu) * 1000:+.0f} ms"
        print(f"| {name} | {wall * 1000:.0f} | {cpu * 1000:.0f} | {over} | {over_cpu} |")
    commands_only = [n for n in runs if n.startswith("metalake")]
    worst_wall = max(statistics.median(walls[n]) - base_wall for n in commands_only)
    worst_cpu = max(statistics.median(cpus[n]) - base_cpu for n in commands_only)
    # Judged on CPU time: on a shared machine, wall time also measures the wait for a core.
    verdict = "meets" if worst_cpu < TARGET_SECONDS else "MISSES"
    print(
        f"\nslowest metalake command over bare Python: {worst_cpu * 1000:.0f} ms CPU, "
        f"{worst_wall * 1000:.0f} ms wall ({verdict} the {TARGET_SECONDS:.2f} s aim on CPU time)"
    )


if __name__ == "__main__":
    main()
