"""Timing shared by the benchmark scripts: CUDA events around each call on a GPU (the work is
asynchronous; host clocks would measure the launch), perf_counter on a CPU. Callers warm up first."""
from __future__ import annotations

import time
from typing import Callable


def time_calls(fn: Callable[[], object], device, reps: int) -> list[float]:
    """Seconds of each of `reps` calls of fn (at least one)."""
    import torch
    times = []
    for _ in range(max(1, reps)):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times
