"""Timing and row bookkeeping shared by the benchmark scripts: CUDA events around each call on a GPU (the work is
asynchronous; host clocks would measure the launch), perf_counter on a CPU. Callers warm up first."""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable


def time_calls(fn: Callable[[], object], device, reps: int, *, sync_each: bool = False) -> list[float]:
    """Seconds of each of `reps` calls of fn (at least one).

    On a GPU the calls are enqueued back to back, an event pair around each, one synchronize at the
    end: while the host stays ahead of the GPU, each pair measures the GPU's time for that call
    alone. sync_each=True synchronizes after every call instead, so each call starts on an idle GPU
    and its pair also holds the host's time to reach the first launch (Python, dispatch, launcher),
    which is how sub-millisecond kernels looked slower through a custom op than launched directly
    (bench/results/kernels_h200_timing.log: the us_sync_each and host_us columns)."""
    import torch
    reps = max(1, reps)
    if torch.device(device).type != "cuda":
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
        if sync_each:
            end.synchronize()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def cuda_kernels(prof):
    """(name, microseconds) of each GPU kernel a finished torch.profiler run recorded."""
    from torch.autograd import DeviceType
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]


def kernel_seconds(fn: Callable[[], object], calls: int = 5) -> float:
    """GPU kernel time per call of fn from torch.profiler (the sum of its CUDA kernels' durations /
    calls): what the kernels themselves take, whatever the host does between them."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(us for _, us in cuda_kernels(prof)) / calls / 1e6


def host_seconds(fn: Callable[[], object], calls: int = 10) -> float:
    """Host time per call of fn (enqueue only; the GPU may still be running): launch overhead."""
    import torch
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls
    torch.cuda.synchronize()
    return host


class RowBench:
    """The bookkeeping the row-based benchmark scripts share (bench/kernels.py, bench/quant.py):
    the device (`--smoke` = CPU), timing, one guarded call per row (an OOM or error is recorded in
    the row and the run goes on), an optional wall-time budget (`args.budget_s`: rows past it are
    recorded as skipped), and the JSON rewritten after every row so a killed run keeps what finished."""

    def __init__(self, args, results: dict, default_json: str):
        import torch
        self.torch = torch
        self.args = args
        self.device = "cpu" if args.smoke else "cuda"
        self.cuda = self.device == "cuda"
        self.results = results
        self.out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / default_json
        self.start = time.perf_counter()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn, *, warmup: int, reps: int, sync_each: bool = False) -> tuple[float, float]:
        """(median seconds, first-call seconds); the first call is the first warm-up. Calls are
        timed back to back unless sync_each (see time_calls)."""
        t0 = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            fn()
        self.sync()
        return statistics.median(time_calls(fn, self.device, reps, sync_each=sync_each)), first

    def free(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def guarded(self, section: str, row: dict, fn):
        """Run one row and record it, whatever happens."""
        torch = self.torch
        budget = getattr(self.args, "budget_s", None)
        elapsed = time.perf_counter() - self.start
        if budget is not None and elapsed > budget:
            row["skipped"] = f"time budget: {elapsed:.0f} s > --budget-s {budget}"
            return self._record(section, row)
        try:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            row.update(fn() or {})
            if self.cuda:
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"OOM: {str(e).splitlines()[0]}"
        except Exception as e:  # a failing row must not lose the others
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row["traceback"] = traceback.format_exc(limit=6)
        self.free()
        return self._record(section, row)

    def _record(self, section: str, row: dict) -> dict:
        self.results[section].append(row)
        self.save()
        print(f"  {section}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "traceback"), flush=True)
        return row

    def save(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=1))

    def environment(self) -> dict:
        """torch / python / device, and the GPU's name, SMs, memory, CUDA and capability."""
        torch = self.torch
        env = {"torch": torch.__version__, "python": platform.python_version(), "device": self.device,
               "smoke": self.args.smoke}
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=p.name, sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                       cuda=torch.version.cuda, capability=".".join(map(str, torch.cuda.get_device_capability())))
        return env
