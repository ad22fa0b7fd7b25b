"""The VRAM matrix: peak memory and DiT step time under budgets, in one process.

    python -m wanimate.bench.vram_matrix [--out DIR] [--deadline 450] [--smoke]

One 14B DiT is built once (random bf16 weights, meta -> to_empty on the GPU) and re-planned for
every row; nothing else is rebuilt until it is needed. Rows, in priority order (each guarded:
an out-of-memory error or any other failure is recorded and the matrix goes on; a row that would
run past --deadline is skipped and recorded as such):

  A. DiT step, bf16, 480p then 720p, at budgets 80 / 48 / 24 GB: engine.offload.plan_vram picks the
     resident block count (the real plan, T5/CLIP/VAE phases included), the block swap is applied,
     the process is capped with torch.cuda.set_per_process_memory_fraction(budget / total), then
     prepare() + 1 warm-up step + --steps timed steps. Recorded: step time (median, CUDA events)
     and its ratio to the fully resident row, peak allocated/reserved, bytes streamed per step,
     and whether the output is bitwise the same as the fully resident model's.
     Plus one ablation at 480p / 24 GB: the same plan with the copies on the compute stream.
  B. VAE decode peak at 77 and 385 frames (480p, 720p; streamed, so the peaks must be equal), a
     tiled decode, and the encode peak of a 77-frame segment.
  C. The whole pipeline (T5, CLIP, VAE encodes, 1 DiT step, decode) at 480p under 24 GB: the
     planner's estimate against the measured peak; T5 and CLIP activation peaks.
  D. With wanimate.quant present: the DiT quantized to FP8 in place, rows at 480p (80 / 24 / 16 GB)
     and 720p (80 / 32 GB), and the pipeline at 480p under 16 GB.

Output: vram_matrix.json (rows + a measured engine.offload.MemoryModel under "memory_model", which
`MemoryModel.from_json` loads) in --out, else $OUT, else ./bench_out; a table on stdout.
Budget: about 5 minutes on an H100 80GB (a 480p bf16 step is ~3.5 s, 720p ~11 s).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from wanimate.bench.bench import (Telemetry, _dit_inputs, _env, build_random, recover, time_median)

GB = 10**9


class Matrix:
    def __init__(self, device, deadline_s: float, log=print):
        self.device, self.deadline, self.log = device, time.perf_counter() + deadline_s, log
        self.rows: list[dict] = []
        self.total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def cap(self, budget: int | None) -> None:
        """Cap the caching allocator at `budget` bytes (None: no cap)."""
        if self.device.type != "cuda":
            return
        gc.collect()
        torch.cuda.empty_cache()
        fraction = 1.0 if budget is None else min(1.0, budget / self.total)
        torch.cuda.set_per_process_memory_fraction(fraction, self.device)

    def reset_peak(self) -> int:
        if self.device.type != "cuda":
            return 0
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> tuple[float | None, float | None]:
        if self.device.type != "cuda":
            return None, None
        return torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device)

    def row(self, kind: str, name: str, fn, est_s: float = 0.0, **info) -> dict:
        """Run fn(row) guarded; fn fills the row dict."""
        row = {"kind": kind, "name": name, **info}
        if self.left() < est_s:
            row["status"] = f"skipped: {self.left():.0f} s left, row needs ~{est_s:.0f} s"
            return self._done(row)
        t = time.perf_counter()
        failure = None
        try:
            fn(row)
            row.setdefault("status", "ok")
        except torch.cuda.OutOfMemoryError as e:
            failure = f"out of memory: {str(e).splitlines()[0]}"
        except Exception as e:                               # noqa: BLE001 - one row must not end the matrix
            failure = f"error: {type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=6)
        if failure is not None:
            row["status"] = failure
            self.cap(None)
            recover(self.device)
        row["wall_s"] = round(time.perf_counter() - t, 2)
        return self._done(row)

    def _done(self, row):
        self.rows.append(row)
        self.log(fmt(row))
        return row


def fmt(r: dict) -> str:
    def g(key, scale=1.0, spec=".2f", unit=""):
        v = r.get(key)
        return f"{v / scale:{spec}}{unit}" if isinstance(v, (int, float)) else "-"
    extra = []
    if "resident_blocks" in r:
        extra.append(f"k={r['resident_blocks']}/{r.get('num_blocks', '?')}" + (" +face" if r.get("stream_face_blocks") else ""))
    if r.get("ratio_to_resident") is not None:
        extra.append(f"x{r['ratio_to_resident']:.3f} vs resident")
    if r.get("bitwise_equal") is not None:
        extra.append("bitwise=" + ("yes" if r["bitwise_equal"] else "NO"))
    if r.get("planned_peak") is not None:
        extra.append(f"planned {r['planned_peak'] / GB:.1f} GB")
    key = next((k for k in ("step_s", "decode_s", "encode_s", "generate_s") if isinstance(r.get(k), (int, float))),
               "step_s")
    return (f"{r['kind']:9s} {r['name']:38s} {key[:-2]:8s} {g(key, spec='.3f', unit=' s'):>9s}  "
            f"peak {g('peak_allocated', GB, '.1f', ' GB'):>8s} (res {g('peak_reserved', GB, '.1f', ' GB')})  "
            f"{'  '.join(extra)}  [{r.get('status', '')}]")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def main(argv=None) -> dict:
    from wanimate.engine.config import preset
    from wanimate.engine.errors import ResourceExhausted
    from wanimate.engine.model import WanAnimateDiT
    from wanimate.engine.offload import (OFFLOADABLE, MemoryModel, apply_block_swap, component_sizes, dit_tokens,
                                         parse_resolution, plan_vram, quant_available)

    ap = argparse.ArgumentParser(description="VRAM matrix: peak memory and step time under budgets")
    ap.add_argument("--out", default=None)
    ap.add_argument("--deadline", type=float, default=450.0, help="seconds; later rows are skipped past it")
    ap.add_argument("--steps", type=int, default=2, help="timed DiT steps per 480p row (720p rows time one)")
    ap.add_argument("--budgets", default="80,48,24", help="GB, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, forced resident counts")
    ap.add_argument("--no-fp8", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    log = print
    m = Matrix(device, args.deadline, log)
    cfg = preset("tiny" if args.smoke else "14b")
    dtype = torch.bfloat16
    budgets = [int(float(b) * GB) for b in args.budgets.split(",")]
    resolutions = {"480p": (32, 32), "720p": (32, 48)} if args.smoke else {"480p": None, "720p": None}
    frames = 5 if args.smoke else 77
    long_frames = 13 if args.smoke else 385
    telemetry = Telemetry(device)
    out = {"env": _env(device, telemetry), "preset": cfg.name, "frames": frames, "rows": m.rows}
    t0 = time.perf_counter()

    dit = build_random(lambda: WanAnimateDiT(cfg.dit), device, dtype, 1)
    log(f"built the {cfg.name} DiT in {time.perf_counter() - t0:.1f} s")
    n = len(dit.blocks)
    sizes = {"bf16": component_sizes(cfg, dtype)}
    state = {"swap": None, "resident_step": {}, "resident_out": {}, "dit_act": {}}

    def plan_for(budget, res, quant, i):
        plan = plan_vram(budget, cfg, res, frames, dtype, quant, sizes=sizes[quant or "bf16"])
        if args.smoke:           # the tiny model fits anywhere: force the swap to exercise the code path
            import dataclasses
            k = max(0, n - 2 * i)
            plan = dataclasses.replace(plan, resident_blocks=k, stream_face_blocks=k == 0)
        return plan

    def set_swap(plan, transport="auto"):
        m.cap(None)
        if state["swap"] is not None:
            state["swap"].remove()
            state["swap"] = None
            recover(device)
        if plan is not None and plan.streams_blocks:
            state["swap"] = apply_block_swap(dit, plan.resident_blocks, device,
                                             stream_face_blocks=plan.stream_face_blocks, transport=transport)
        recover(device)

    def dit_row(label, res_name, budget, i, quant=None, timed=1, transport="auto"):
        size = resolutions[res_name] or parse_resolution(res_name)
        key = (res_name, quant)
        est = (timed + 1) * state["resident_step"].get(key, 12.0 if res_name == "720p" else 4.0) + 8

        def run(row):
            try:
                plan = plan_for(budget, size, quant, i)
            except ResourceExhausted as e:
                row["status"] = f"does not fit (planner): {e}"
                return
            row.update(resident_blocks=plan.resident_blocks, num_blocks=n, stream_face_blocks=plan.stream_face_blocks,
                       offload=list(plan.offload), vae_tiling=bool(plan.vae_tiling), planned_peak=plan.peak_bytes,
                       planned_dit_phase=plan.phases["DiT step"], transport=transport)
            t = time.perf_counter()
            set_swap(plan, transport)
            row["reconfigure_s"] = round(time.perf_counter() - t, 2)
            x = _dit_inputs(cfg.dit, size, frames, device, dtype)
            m.cap(budget if not args.smoke else None)
            base = m.reset_peak()
            with torch.no_grad():
                t = time.perf_counter()
                cond = dit.prepare(x["y"], x["pose"], x["face"], x["context"], x["clip"])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["prepare_s"] = round(time.perf_counter() - t, 3)
                row["prepare_peak_allocated"] = m.peak()[0]
                before_step = m.reset_peak()
                first = dit.denoise(x["latents"], x["t"], cond)             # warm-up; output for bitwise
                act = (m.peak()[0] - before_step) if device.type == "cuda" else None
                stats0 = state["swap"].stats.bytes_copied if state["swap"] else 0
                row["step_s"], row["step_times"] = time_median(lambda: dit.denoise(x["latents"], x["t"], cond),
                                                               device, timed)
                if state["swap"]:
                    row["bytes_streamed_per_step"] = (state["swap"].stats.bytes_copied - stats0) / max(1, timed)
                    row["slot_bytes"] = state["swap"].slot_bytes
                peak, reserved = m.peak()
                row.update(peak_allocated=peak, peak_reserved=reserved, base_allocated=base)
                tokens = dit_tokens(cfg.dit, size, frames)
                if act is not None:
                    row["step_activation_bytes"] = act
                    row["act_per_token_dim"] = act / (tokens * cfg.dit.dim)
                    state["dit_act"].setdefault(quant or "bf16", []).append(row["act_per_token_dim"])
                out_cpu = first.float().cpu()
                del cond, first, x
            m.cap(None)
            if plan.resident_blocks == n and not plan.stream_face_blocks:
                state["resident_step"][key] = row["step_s"]
                state["resident_out"][key] = out_cpu
            if key in state["resident_step"]:
                row["ratio_to_resident"] = row["step_s"] / state["resident_step"][key]
            if key in state["resident_out"]:
                row["bitwise_equal"] = _bits_equal(out_cpu, state["resident_out"][key])
            row["telemetry"] = telemetry.read()

        return m.row("dit", label, run, est, resolution=res_name, budget=budget, quant=quant)

    # -- A. bf16 DiT rows ---------------------------------------------------------------------------
    for res_name in ("480p", "720p"):
        timed = args.steps if res_name == "480p" else 1
        for i, budget in enumerate(budgets):
            dit_row(f"bf16 {res_name} @ {budget / GB:.0f} GB", res_name, budget, i, timed=timed)
        if res_name == "480p":
            i = len(budgets) - 1
            dit_row(f"bf16 {res_name} @ {budgets[-1] / GB:.0f} GB same-stream", res_name, budgets[-1], i,
                    timed=timed, transport="same-stream")
    set_swap(None)

    # -- B. VAE rows --------------------------------------------------------------------------------
    from wanimate.engine.vae import Tiling, WanVAE
    vae_state: dict = {}

    def vae(row=None):
        if "vae" not in vae_state:
            vae_state["vae"] = build_random(lambda: WanVAE(cfg.vae), device, torch.float32, 4, std=None)
        return vae_state["vae"]

    def decode_row(res_name, nf, tiling=None):
        size = resolutions[res_name] or parse_resolution(res_name)
        h, w = size
        per_frame = vae_state.get(("per_frame", res_name), 0.12 if res_name == "480p" else 0.3)

        def run(row):
            z = torch.randn(1, 16, (nf - 1) // 4 + 1, h // 8, w // 8, device=device)
            base = m.reset_peak()
            t = time.perf_counter()
            count = 0
            with torch.no_grad():
                for chunk in vae().decode_stream(z, tiling=tiling):
                    count += chunk.shape[2]
                    del chunk
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["decode_s"] = round(time.perf_counter() - t, 2)
            vae_state[("per_frame", res_name)] = row["decode_s"] / nf
            peak, reserved = m.peak()
            row.update(frames_out=count, peak_allocated=peak, peak_reserved=reserved, base_allocated=base)
            if peak is not None:
                row["decode_per_px"] = (peak - base) / (h * w)
        return m.row("vae", f"decode {res_name} {nf} frames" + (" tiled" if tiling else ""), run, per_frame * nf + 3,
                     resolution=res_name, frames=nf, tiled=bool(tiling))

    def encode_row(res_name):
        size = resolutions[res_name] or parse_resolution(res_name)
        h, w = size

        def run(row):
            video = torch.rand(1, 3, frames, h, w, device=device) * 2 - 1
            base = m.reset_peak()
            t = time.perf_counter()
            with torch.no_grad():
                vae().encode(video)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["encode_s"] = round(time.perf_counter() - t, 2)
            peak, reserved = m.peak()
            row.update(peak_allocated=peak, peak_reserved=reserved, base_allocated=base)
            if peak is not None:
                row["encode_per_px"] = (peak - base) / (h * w)
        return m.row("vae", f"encode {res_name} {frames} frames", run, 6 if res_name == "480p" else 12,
                     resolution=res_name, frames=frames)

    def compare_decode_peaks():
        for res_name in ("480p", "720p"):
            pair = [r for r in m.rows if r["kind"] == "vae" and r.get("peak_allocated") and not r.get("tiled")
                    and r["name"].startswith("decode") and r["resolution"] == res_name]
            if len(pair) == 2:
                a, b = sorted(pair, key=lambda r: r["frames"])
                same = abs(a["peak_allocated"] - b["peak_allocated"]) <= 0.02 * a["peak_allocated"]
                out.setdefault("vae_decode_peak_same", {})[res_name] = same
                log(f"VAE decode peak {res_name}: {a['frames']} frames {a['peak_allocated'] / GB:.2f} GB, "
                    f"{b['frames']} frames {b['peak_allocated'] / GB:.2f} GB ({'same' if same else 'DIFFERENT'})")

    decode_row("480p", frames)
    decode_row("480p", long_frames)
    decode_row("480p", frames, Tiling())
    encode_row("480p")
    decode_row("720p", frames)
    decode_row("720p", frames, Tiling())
    encode_row("720p")
    compare_decode_peaks()


    # -- C. the whole pipeline under a budget ----------------------------------------------------------
    def pipeline_row(label, budget, quant=None):
        from wanimate.engine.offload import apply_plan
        from wanimate.engine.pipeline import ArraySource, GenerateOptions, Pipeline
        size = resolutions["480p"] or parse_resolution("480p")

        def run(row):
            pipe = state.get("pipe")
            if pipe is None:
                from wanimate.engine.clip import CLIPVisual
                from wanimate.engine.text import ByteTokenizer, T5Encoder
                set_swap(None)
                t5 = build_random(lambda: T5Encoder(cfg.t5), device, dtype, 2)
                clip = build_random(lambda: CLIPVisual(cfg.clip), device, torch.float16, 3)
                vae = vae_state.get("vae") or build_random(lambda: WanVAE(cfg.vae), device, torch.float32, 4, std=None)
                pipe = state["pipe"] = Pipeline(dit, vae, clip, text_encoder=t5,
                                                tokenizer=ByteTokenizer.for_config(cfg.t5), device=device)
                # Activation peaks of T5 and CLIP, everything resident.
                base = m.reset_peak()
                with torch.no_grad():
                    pipe.encode_prompts("a person dancing", "")
                if device.type == "cuda":
                    state["t5_act"] = m.peak()[0] - base
                base = m.reset_peak()
                with torch.no_grad():
                    pipe.clip(torch.randn(1, 3, cfg.clip.image_size, cfg.clip.image_size, device=device,
                                          dtype=torch.float16))
                if device.type == "cuda":
                    state["clip_act"] = m.peak()[0] - base
                # Parked on the host between pipeline rows, so the DiT rows' budgets hold the DiT only.
                for module in (t5, clip, vae):
                    module.to("cpu")
                recover(device)
            set_swap(None)
            try:
                plan = plan_vram(budget, cfg, size, frames, dtype, quant, sizes=sizes[quant or "bf16"])
            except ResourceExhausted as e:
                row["status"] = f"does not fit (planner): {e}"
                return
            if args.smoke:
                import dataclasses
                plan = dataclasses.replace(plan, resident_blocks=1, offload=OFFLOADABLE)
            row.update(resident_blocks=plan.resident_blocks, num_blocks=n, stream_face_blocks=plan.stream_face_blocks,
                       offload=list(plan.offload), planned_peak=plan.peak_bytes,
                       planned_phases={k: v for k, v in plan.phases.items()})
            placement = apply_plan(pipe, plan)
            try:
                rng = np.random.default_rng(0)
                h, w = size
                s = cfg.dit.motion_size
                ref = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pose = ArraySource(rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8))
                face = ArraySource(rng.integers(0, 256, (frames, s, s, 3), dtype=np.uint8))
                m.cap(budget if not args.smoke else None)
                base = m.reset_peak()
                t = time.perf_counter()
                pipe._grey_latents.clear()
                result = pipe.generate(ref, pose, face, GenerateOptions(steps=1, clip_len=frames, seed=0),
                                       sink=lambda f: None)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["generate_s"] = round(time.perf_counter() - t, 2)
                row["timings"] = result.timings
                peak, reserved = m.peak()
                row.update(peak_allocated=peak, peak_reserved=reserved, base_allocated=base,
                           placement=placement.describe())
                if peak is not None:
                    row["fits_budget"] = reserved <= budget
            finally:
                m.cap(None)
                placement.remove()
                for module in (pipe.text_encoder, pipe.clip, pipe.vae):
                    module.to("cpu")
                recover(device)

        return m.row("pipeline", label, run, 40, budget=budget, quant=quant)

    pipeline_row("480p @ 24 GB, 1 step", budgets[-1])

    # -- D. FP8 -------------------------------------------------------------------------------------
    fp8 = not args.no_fp8 and quant_available()
    if not fp8:
        out["fp8"] = "skipped: " + ("--no-fp8" if args.no_fp8 else "wanimate.quant is not in this tree")
        log(out["fp8"])
    else:
        def quantize(row):
            from wanimate.quant import QuantConfig, quantize_
            set_swap(None)
            t = time.perf_counter()
            quantize_(dit, QuantConfig("fp8"))
            recover(device)
            row["quantize_s"] = round(time.perf_counter() - t, 2)
            sizes["fp8"] = component_sizes(cfg, dtype, "fp8")
            row["dit_bytes"] = sizes["fp8"].dit
        q = m.row("setup", "quantize DiT to fp8", quantize, 30)
        if q["status"] == "ok":
            for i, budget in enumerate([80 * GB, 24 * GB, 16 * GB]):
                dit_row(f"fp8 480p @ {budget / GB:.0f} GB", "480p", budget, i, quant="fp8", timed=args.steps)
            for i, budget in enumerate([80 * GB, 32 * GB]):
                dit_row(f"fp8 720p @ {budget / GB:.0f} GB", "720p", budget, i, quant="fp8", timed=1)
            set_swap(None)
            pipeline_row("fp8 480p @ 16 GB, 1 step", 16 * GB, quant="fp8")
    set_swap(None)
    decode_row("720p", long_frames)                    # last: the longest row, the least needed
    compare_decode_peaks()

    # -- the measured memory model --------------------------------------------------------------------
    vae_rows_ok = [r for r in m.rows if r["kind"] == "vae" and r.get("status") == "ok"]
    measured = {}
    if device.type == "cuda":
        if state["dit_act"].get("bf16"):
            measured["dit_act_per_token_dim"] = [["bfloat16", max(state["dit_act"]["bf16"])]]
        dec = [r["decode_per_px"] for r in vae_rows_ok if "decode_per_px" in r and not r["tiled"]]
        dec_t = [r["decode_per_px"] for r in vae_rows_ok if "decode_per_px" in r and r["tiled"]]
        enc = [r["encode_per_px"] for r in vae_rows_ok if "encode_per_px" in r]
        if dec:
            measured["vae_decode_per_px"] = max(dec)
        if dec_t:
            measured["vae_decode_tiled_per_px"] = max(dec_t)
        if enc:
            measured["vae_encode_per_px"] = max(enc)
        for k in ("t5_act", "clip_act"):
            if state.get(k):
                measured[k] = state[k]
        reserved = [r["peak_reserved"] / r["peak_allocated"] for r in m.rows
                    if r.get("peak_allocated") and r.get("peak_reserved") and r["kind"] == "dit"]
        if reserved:
            measured["overhead"] = max(1.05, round(max(reserved), 3))
        measured["source"] = f"bench/vram_matrix.py on {out['env'].get('gpu', device)}, {out['env']['time']}"
        defaults = MemoryModel().to_json()
        out["memory_model"] = {**defaults, **measured}
        out["memory_model_defaults"] = defaults
    out["total_s"] = round(time.perf_counter() - t0, 1)

    directory = Path(args.out or os.environ.get("OUT") or "bench_out")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ("vram_matrix_smoke.json" if args.smoke else "vram_matrix.json")
    path.write_text(json.dumps(out, indent=1, default=str))
    log("")
    for r in m.rows:
        log(fmt(r))
    if "memory_model" in out:
        log("measured memory model: " + json.dumps({k: v for k, v in out["memory_model"].items() if k in measured}))
    log(f"total {out['total_s']} s; wrote {path}")
    return out


if __name__ == "__main__":
    main()
