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

    def time(self, fn, *, warmup: int, reps: int) -> tuple[float, float]:
        """(median seconds, first-call seconds); the first call is the first warm-up."""
        t0 = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            fn()
        self.sync()
        return statistics.median(time_calls(fn, self.device, reps)), first

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
