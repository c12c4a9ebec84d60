"""Shared benchmark helpers: threads, interleaved median timing, peak memory, tables, JSON.

Timing: cases are run in rounds, one call of each case per round, so that load from
other processes on a shared machine falls on all of them alike; each case reports the
median of its rounds, and comparisons are ratios of medians taken in the same run.
Wall time is the measure; process CPU time is recorded beside it as a check that is
far less sensitive to other processes' load.

Peak memory (CPU): the cases run one after another in one fresh Python process, each
measured once after a warm-up call (every buffer of one is unmapped before the next
starts). There glibc's
MALLOC_MMAP_THRESHOLD_ is fixed at 64 KiB, so every tensor buffer above that size is its
own mmap, mapped when allocated and unmapped when freed: resident memory follows the
live tensors instead of a heap that keeps freed pages. After the case's set-up (weights,
inputs) the kernel's peak-RSS counter is reset (`/proc/self/clear_refs`, "5"), the case
runs once, and the peak is VmHWM - VmRSS at the reset: the bytes the case itself held
at its worst moment (activations, saved tensors, gradients, temporaries). Allocations
below 64 KiB live in the heap and count too; they are noise at benchmark sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

MMAP_THRESHOLD = 65536


def set_threads(num_threads: int) -> int:
    """Fix torch's intra-op threads (the benchmark's stated thread count) and return it."""
    torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def time_interleaved(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, process CPU seconds) per call of each case, `repeats` rounds each.

    `warmup` untimed rounds come first. Each round calls every case once, so slow spells
    of a shared machine are spread over all cases instead of landing on one. Odd rounds
    run the cases in reverse order: what a case leaves behind (freed pages, the heap's
    shape, caches) then precedes each other case equally often, where a fixed order
    always handed it to the same one. CPU time (all threads) is the second view: other
    processes' load hardly moves it, while it stretches wall time, most of all for code
    made of many small parallel ops.
    """
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases.items())
    for r in range(warmup + repeats):
        for name, fn in order if r % 2 == 0 else order[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if r >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
    return wall, cpu


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def positive_int(text: str) -> int:
    """argparse type of rounds, threads and sizes: an int >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type of warm-up rounds: an int >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
    return value


def fill_defaults(args: argparse.Namespace, **defaults: tuple[object, object]) -> None:
    """Give each flag left unset (None) its (normal, --quick) default.

    --quick chooses small defaults; a flag given explicitly is kept, quick or not.
    """
    for name, (normal, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)


def trainable_presets() -> list[str]:
    """Presets a benchmark can build and run: the large ones are for counting on `meta`."""
    from moekit.model import LARGE_PRESETS, PRESETS

    return sorted(set(PRESETS) - set(LARGE_PRESETS))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def peak_rss_problem(probe_mib: int = 32) -> str | None:
    """None when the kernel's peak-RSS counter can measure a case here, else why not.

    Some kernels and sandboxes refuse the reset or keep no true high-water mark, and then
    every peak would read as some unrelated number (or 0). A probe buffer of known size,
    touched and freed after a reset, must show up in VmHWM before any case is trusted.
    """
    try:
        seen_kib = peak_bytes_of(lambda: torch.ones(probe_mib * 2**20 // 4)) // 1024
    except OSError as err:
        return f"the peak-RSS counter cannot be reset or read here ({err})"
    if seen_kib < 0.9 * probe_mib * 1024:
        return (
            f"a {probe_mib} MiB buffer, touched and freed, raised the peak-RSS counter "
            f"by {seen_kib} KiB: it does not track a high-water mark here"
        )
    return None


def peak_bytes_of(run: Callable[[], object]) -> int:
    """Peak resident bytes `run()` adds to this process (see the module docstring).

    Meaningful in a process started by `run_in_fresh_process`, where the malloc
    threshold makes freed tensors leave resident memory, and where `peak_rss_problem`
    found nothing wrong.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - base) * 1024


def implausible_peak(layer: str, peak: int, grads: int) -> str | None:
    """Why a layer's measured peak cannot be its true peak, or None if it can be.

    Both layers allocate their weight gradients afresh in the measured call (the MoE's
    expert bank has released the storage it keeps for reuse), beside their activations,
    so a true peak exceeds the gradients' size. A reading at or below it means the
    peak-RSS counter missed memory (seen on a machine whose probe passed: the quick
    shapes' dense peak read 0), and a ratio over it would be meaningless, negative or a
    division by zero.
    """
    if peak > grads:
        return None
    return (
        f"the {layer} layer's measured peak ({peak / 2**10:.0f} KiB) is not above the weight "
        f"gradients it allocates ({grads / 2**10:.0f} KiB): the counter missed memory"
    )


def run_in_fresh_process(
    argv: Sequence[str], timeout: float = 900, fixed_malloc_threshold: bool = True
) -> str:
    """stdout's last line of `python argv...`, by default with the malloc threshold fixed.

    Peak-memory cases run there (see the module docstring), away from the buffers and
    heap the timing runs have left in this process. Timing runs in a process of their
    own keep glibc's defaults (fixed_malloc_threshold=False), as a user's process has.
    """
    env = dict(os.environ)
    if fixed_malloc_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    done = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{list(argv)} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def fmt_mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.0f}"


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        pairs = enumerate(zip(row, widths, strict=True))
        padded = [c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs]
        print("  ".join(padded))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def emit_json(result: dict[str, object]) -> None:
    """The machine-readable result: one JSON object, the last line of the output."""
    print(json.dumps(result, sort_keys=True), flush=True)
