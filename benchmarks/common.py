"""Timing helpers shared by the benchmarks in this folder.

Comparisons are only fair when both contenders see the same machine state, so
`compare` interleaves them: A, B, A, B, ... after a warm-up of each, and
reports medians (robust to a busy neighbour stealing a core for one repeat).

    from benchmarks.common import compare, print_comparison, set_threads

    set_threads(4)
    timings = compare({"ours": run_ours, "hf": run_hf}, repeats=10, warmup=2)
    print_comparison(timings, work=4 * 128, unit="tokens")
"""

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Timing:
    """Every measured duration (seconds) of one contender."""

    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Half the interquartile range relative to the median: how noisy the repeats were."""
        if len(self.seconds) < 4:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.seconds, n=4)
        return (q3 - q1) / 2 / self.median

    def rate(self, work: float) -> float:
        """Work units (tokens, say) per second at the median duration."""
        return work / self.median


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads for every contender (None: leave torch's default)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {
    "wall": time.perf_counter,  # what a user waits
    "cpu": time.process_time,  # CPU seconds of this process: steadier on a shared machine
}


def time_once(
    fn: Callable[[], Any], device: torch.device | None = None, clock: str = "wall"
) -> float:
    now = CLOCKS[clock]
    _sync(device)
    start = now()
    fn()
    _sync(device)
    return now() - start


def compare(
    contenders: dict[str, Callable[[], Any]],
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | None = None,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Time each contender `repeats` times, interleaved, after `warmup` untimed calls each.

    `clock` is "wall" (elapsed time) or "cpu" (this process's CPU time, which a busy
    neighbour disturbs less; with several threads it also counts their spinning).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, not {clock!r}")
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    timings = {name: Timing(name) for name in contenders}
    names = list(contenders)
    for i in range(repeats):
        # alternate the order too, so neither contender always runs right after the other
        for name in names if i % 2 == 0 else reversed(names):
            timings[name].seconds.append(time_once(contenders[name], device, clock))
    return timings


def print_comparison(
    timings: dict[str, Timing], work: float, unit: str = "tokens", baseline: str | None = None
) -> dict[str, float]:
    """Print a rate per contender and each one's ratio to `baseline` (default: the last one)."""
    baseline = baseline or list(timings)[-1]
    base_rate = timings[baseline].rate(work)
    width = max(len(name) for name in timings)
    ratios = {}
    for name, timing in timings.items():
        ratios[name] = timing.rate(work) / base_rate
        print(
            f"{name:<{width}}  {timing.rate(work):>12,.0f} {unit}/s   "
            f"median {timing.median * 1e3:8.1f} ms  (+/-{timing.spread:.0%}, "
            f"{len(timing.seconds)} runs)   ratio to {baseline}: {ratios[name]:.3f}"
        )
    return ratios


def describe_machine(device: torch.device | None = None) -> str:
    """One line naming what the numbers were measured on."""
    where = str(device or "cpu")
    if device is not None and device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    return (
        f"torch {torch.__version__}, {where}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads"
    )


def common_arguments(description: str) -> argparse.ArgumentParser:
    """The options every benchmark here accepts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per contender")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: process CPU time (steadier on a shared machine)",
    )
    return parser
