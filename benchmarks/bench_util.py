"""Timing helpers: interleaved rounds, medians, paired ratios; and a description of the machine."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

__all__ = [
    "Comparison",
    "gc_paused",
    "interleave",
    "machine_info",
    "median",
    "quantile",
]

#: A round: runs the measured operation ``n`` times and returns the elapsed nanoseconds per operation.
Round = Callable[[], float]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Collect, then keep the cyclic GC off while timing (as ``timeit`` does), so a collection triggered by
    one case is not billed to the other."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def median(values: Sequence[float]) -> float:
    """The median (0.0 for no values)."""
    return statistics.median(values) if values else 0.0


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Comparison:
    """Per-round timings of a candidate and its baseline, measured in alternating order."""

    candidate: List[float]
    baseline: List[float]

    @property
    def candidate_median(self) -> float:
        """Median nanoseconds per operation of the candidate."""
        return median(self.candidate)

    @property
    def baseline_median(self) -> float:
        """Median nanoseconds per operation of the baseline."""
        return median(self.baseline)

    @property
    def ratio(self) -> float:
        """Median of the paired per-round ratios candidate/baseline (time ratio: lower is better)."""
        return median(self.paired_ratios) if self.paired_ratios else float("inf")

    @property
    def paired_ratios(self) -> List[float]:
        """Round-by-round ratios (each pair ran back to back, so drift cancels)."""
        return [c / b for c, b in zip(self.candidate, self.baseline) if b]

    @property
    def ratio_spread(self) -> Tuple[float, float]:
        """The 25th and 75th percentile of the paired ratios."""
        pairs = self.paired_ratios
        return quantile(pairs, 0.25), quantile(pairs, 0.75)


def interleave(candidate: Round, baseline: Round, rounds: int, warmup: int = 3) -> Comparison:
    """Run ``rounds`` rounds of each, alternating which goes first, with the GC paused; keep every round."""
    cand: List[float] = []
    base: List[float] = []
    with gc_paused():
        for _ in range(warmup):
            candidate()
            baseline()
        for index in range(rounds):
            if index % 2 == 0:
                cand.append(candidate())
                base.append(baseline())
            else:
                base.append(baseline())
                cand.append(candidate())
            if index % 50 == 49:
                # Keep the heap tidy on long runs without timing a collection.
                gc.collect()
    return Comparison(cand, base)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> Dict[str, str]:
    """Platform, CPU, cores, Python and the versions of the packages measured."""
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    try:
        load = "load average {:.2f} {:.2f} {:.2f} (other work on the machine adds noise, not bias: rounds " \
               "alternate)".format(*os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": f"{cores} (usable: {usable})",
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "load at start": load,
        "packages": ", ".join(
            f"{name} {_version(name)}"
            for name in (
                "otel-o2audit",
                "opentelemetry-sdk",
                "opentelemetry-exporter-otlp-proto-http",
                "protobuf",
                "requests",
                "urllib3",
            )
        ),
    }
