"""Shared timing helper: alternate the contenders in one process, report medians."""

from __future__ import annotations

import statistics
import time


def alternate(contenders: dict, rounds: int = 7, reps: int = 20, warmup: int = 3) -> dict:
    """Median seconds per call of each zero-argument callable, measured in interleaved rounds.

    Interleaving (A, B, A, B, ...) spreads any drift of the machine (other load, frequency
    changes) over every contender equally.
    """
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - t0) / reps)
    return {name: statistics.median(s) for name, s in samples.items()}
