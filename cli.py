"""The `wanimate` command line: a thin typer app. Every command calls a typed library function
that tests and servers call directly; no logic lives only here."""
from __future__ import annotations

import json
import os
from pathlib import Path

# Before torch is imported (commands import it lazily): idle OpenMP threads sleep instead of
# spinning, which on small shared CPU machines is the difference between seconds and minutes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="wanimate: an optimized deployment engine for Wan2.2-Animate-14B.")


@app.command()
def verify(directory: Path = typer.Argument(..., help="a folder of parity fixtures (json + safetensors/npz)"),
           vae_backend: str = typer.Option("torch", help="run the VAE fixtures through: torch | onnx")):
    """Run every parity fixture in DIRECTORY against the engine; exit 1 if any fails."""
    from .engine.verify import format_table, verify as run_verify

    checks = run_verify(directory, progress=lambda s: typer.echo(s, err=True), vae_backend=vae_backend)
    typer.echo(format_table(checks))
    raise typer.Exit(0 if all(c.passed for c in checks) else 1)


def _parse_size(size: str | None) -> tuple[int, int] | None:
    """'832x480' -> (width, height); both must be multiples of 16."""
    from .engine.errors import ValidationError
    if size is None:
        return None
    try:
        w, h = (int(v) for v in size.lower().replace("*", "x").split("x"))
    except ValueError:
        raise ValidationError(f"--size must look like 832x480 (width x height), got {size!r}") from None
    if w <= 0 or h <= 0 or w % 16 or h % 16:
        raise ValidationError(f"--size {w}x{h}: width and height must be positive multiples of 16 (e.g. 832x480, 1280x720)")
    return w, h


def _parse_pair(text: str) -> tuple[int, int]:
    from .engine.errors import ValidationError
    try:
        first, last = (int(v) for v in text.split(","))
    except ValueError:
        raise ValidationError(f"expected two integers like 1,1, got {text!r}") from None
    return first, last


def _parse_steps(steps: str):
    from .engine.errors import ValidationError
    try:
        if "," in steps:
            return tuple(float(v) for v in steps.split(",") if v.strip())
        return int(steps)
    except ValueError:
        raise ValidationError(f"--steps must be a count (20) or a timestep list (1000,937.5,833.3,625), got {steps!r}") from None


@app.command()
def run(
    output: Path = typer.Option(..., "-o", "--output", help="the video to write (.mp4); a .json sidecar goes beside it"),
    src: Path = typer.Option(None, help="a preprocessed folder: src_pose.mp4, src_face.mp4, src_ref.png [+ src_bg.mp4, src_mask.mp4]"),
    image: Path = typer.Option(None, help="reference image (preprocessed together with --video)"),
    video: Path = typer.Option(None, help="driving video"),
    mode: str = typer.Option("animate", help="animate | replace"),
    ckpt_dir: Path = typer.Option(None, help="Wan2.2-Animate-14B folder; without it the embedded tiny model runs (random weights)"),
    steps: str = typer.Option(None, help="denoising steps (default 20; 4 for the embedded model) or a timestep list 1000,937.5,833.3,625"),
    solver: str = typer.Option("unipc", help="unipc | dpm++"),
    shift: float = typer.Option(None, help="schedule shift (default 5.0)"),
    seed: int = typer.Option(-1, help="-1 picks a random seed, reported in the sidecar"),
    size: str = typer.Option(None, help="output size WxH for --image/--video preprocessing (multiples of 16)"),
    clip_len: int = typer.Option(77, help="frames per segment (4n+1)"),
    refert_num: int = typer.Option(1, help="frames carried between segments (1 or 5)"),
    guide_scale: float = typer.Option(1.0, help="> 1 adds the official negative-prompt / black-face pass"),
    prompt: str = typer.Option("", help="text prompt (default: the official one)"),
    negative_prompt: str = typer.Option("", help="negative prompt (default: the official one)"),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)"),
    fp32: bool = typer.Option(False, "--fp32", help="run the DiT in fp32 instead of the official bf16 mixed precision"),
    attention: str = typer.Option("sdpa", help="self-attention backend: sdpa | flash | xformers | triton | sage"),
    exact_steps: str = typer.Option("1,1", help="with a quantized attention backend: first,last steps kept exact"),
    vae_backend: str = typer.Option("torch", help="torch | compiled | onnx | tensorrt (exported once per resolution)"),
    vae_cache: Path = typer.Option(None, help="folder for exported VAE graphs/engines (default ~/.cache/wanimate/vae)"),
    quant: str = typer.Option(None, help="quantize the DiT weights at load: fp8 | int8 | int8_wo | nf4"),
    relighting_lora: bool = typer.Option(False, help="merge the checkpoint's relighting LoRA (replace mode) at load"),
    vram_budget: str = typer.Option(None, help="fit within this much GPU memory (e.g. 24GB): stream DiT blocks, offload encoders"),
    kernels: bool = typer.Option(True, help="fused Triton kernels in the DiT when a GPU and triton are present"),
):
    """Generate a video: the reference image performs the driving video's motion (animate) or
    replaces its person (replace)."""
    import torch
    from tqdm import tqdm

    from .engine.errors import WanimateError
    from .engine.pipeline import GenerateOptions
    from .engine.runner import run as run_job

    bars: dict = {}

    def progress(stage: str, done: int, total: int):
        bar = bars.get(stage)
        if bar is None:
            for old in bars.values():
                old.close()
            bars.clear()
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", leave=True)
        bar.update(done - bar.n)

    try:
        wanted = _parse_size(size)
        embedded = ckpt_dir is None
        options = GenerateOptions(mode=mode, steps=_parse_steps(steps) if steps else (4 if embedded else 20),
                                  solver=solver, shift=shift, seed=seed, clip_len=clip_len, refert_num=refert_num,
                                  guide_scale=guide_scale, prompt=prompt, negative_prompt=negative_prompt,
                                  attention=attention, exact_steps=_parse_pair(exact_steps))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pre = {"resolution_area": wanted} if wanted else ({"resolution_area": EMBEDDED_AREA} if embedded else {})
        report = run_job(output, options, src=src, image=image, video=video, ckpt_dir=ckpt_dir, device=device,
                         dtype=torch.float32 if fp32 else torch.bfloat16, preprocess_options=pre,
                         vae_backend=vae_backend, vae_cache=vae_cache,
                         load_options={"quant": quant, "relighting_lora": relighting_lora}, vram_budget=vram_budget,
                         kernels=kernels,
                         progress=progress, log=lambda s: typer.echo(f"wanimate: {s}", err=True))
    except WanimateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    finally:
        for bar in bars.values():
            bar.close()
    t = report.timings
    typer.echo(f"wrote {report.output} ({report.frames} frames, {report.size[1]}x{report.size[0]}, "
               f"{report.segments} segments, seed {report.seed}, {t.get('wall_s', 0):.1f} s) and {report.sidecar}")
    if report.embedded:
        typer.echo("note: made by the embedded tiny model with random weights (pass --ckpt-dir for real output)")


@app.command()
def preprocess(
    image: Path = typer.Option(..., help="reference image"),
    video: Path = typer.Option(..., help="driving video"),
    output: Path = typer.Option(..., "-o", "--output", help="folder to write (src_pose.mp4, src_face.mp4, src_ref.png, ...)"),
    mode: str = typer.Option("animate", help="animate | replace (adds src_bg.mp4 and src_mask.mp4)"),
    retarget: bool = typer.Option(False, help="rescale the driving skeleton's limbs to the reference's proportions"),
    backend: str = typer.Option("auto", help="auto | embedded (MediaPipe) | official (checkpoint ONNX models)"),
    ckpt_dir: Path = typer.Option(None, help="checkpoint folder holding process_checkpoint/ (official backend)"),
    fps: float = typer.Option(30.0, help="resample the driving video to this fps (official default 30)"),
    size: str = typer.Option("1280x720", help="target area WxH; frames keep their aspect ratio, multiples of 16"),
    max_duration_s: float = typer.Option(600.0, help="longer videos are cut to this many seconds, with a warning"),
    overwrite: bool = typer.Option(False, help="replace a non-empty output folder"),
):
    """Pose skeletons, 512x512 face crops and (replace) masks from a driving video, in the format
    the official preprocessing writes."""
    from .engine.errors import WanimateError
    from .engine.preprocess import preprocess as run_preprocess

    try:
        w, h = _parse_size(size)
        result = run_preprocess(image, video, output, mode=mode, retarget=retarget, backend=backend, ckpt_dir=ckpt_dir,
                                fps=fps, resolution_area=(w, h), max_duration_s=max_duration_s, overwrite=overwrite)
    except WanimateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"wrote {result.out_dir}: {result.n_frames} frames {result.size[0]}x{result.size[1]} at {result.fps:g} fps, "
               f"person in {100 * result.person_rate:.0f}% of frames, backend {result.backend}, "
               f"{result.throughput_fps:.1f} frames/s")


# The embedded default's generation size (area as width x height): small enough for a CPU.
EMBEDDED_AREA = (128, 72)


export_app = typer.Typer(help="Export the VAE or the preprocessing models to ONNX / TensorRT.")
app.add_typer(export_app, name="export")


@export_app.command("vae")
def export_vae_cmd(
    output: Path = typer.Option(..., "-o", "--output", help="folder for the exported graphs (one subfolder per size)"),
    ckpt_dir: Path = typer.Option(None, help="checkpoint folder (its converted Wan2.1_VAE); default: the embedded tiny VAE"),
    format: str = typer.Option("onnx", help="onnx | tensorrt"),
    precision: str = typer.Option("fp32", help="fp32 | tf32 | bf16 | fp16 (TensorRT)"),
    size: list[str] = typer.Option(["832x480"], help="pixel size WxH; repeat for several"),
    device: str = typer.Option(None, help="where tracing runs (cuda makes real-size exports fast)"),
):
    """The VAE's encoder and decoder as per-step graphs with the causal cache as explicit I/O."""
    from .engine.errors import WanimateError
    from .export.onnx import export_vae

    try:
        sizes = [(h, w) for w, h in (_parse_size(s) for s in size)]
        manifests = export_vae(ckpt_dir if ckpt_dir else "recipe:tiny", output, format=format, precision=precision,
                               resolution=sizes, device=device)
    except WanimateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    for m in manifests:
        typer.echo(json.dumps({k: v for k, v in m.items() if k in ("resolution", "dir", "verified_rel_l2", "format")}))


@export_app.command("pose")
def export_pose_cmd(
    ckpt_dir: Path = typer.Option(..., help="checkpoint folder holding process_checkpoint/det and pose2d"),
    output: Path = typer.Option(..., "-o", "--output"),
    format: str = typer.Option("onnx", help="onnx | tensorrt"),
    precision: str = typer.Option("fp16", help="TensorRT precision"),
):
    """YOLOv10m and ViTPose-H with a dynamic batch (and TensorRT engines)."""
    from .engine.errors import WanimateError
    from .export.onnx import export_pose

    try:
        base = ckpt_dir / "process_checkpoint"
        out = export_pose(base / "det" / "yolov10m.onnx", base / "pose2d" / "vitpose_h_wholebody.onnx", output,
                          format=format, precision=precision)
    except WanimateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps({k: str(v.get("onnx", v)) for k, v in out.items()}))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context):
    """Stage timings on random 14B weights (no checkpoint): T5, CLIP, VAE, DiT step, segment,
    GPU-s per video-s; --compare diffusers, --vram-budget, --quant fp8, --kernels, --attention.
    Run `wanimate bench --help-bench` for every option."""
    from .bench.bench import main as bench_main
    bench_main(["--help" if a == "--help-bench" else a for a in ctx.args])


@app.command()
def quantize(
    ckpt_dir: Path = typer.Option(..., help="checkpoint folder (official or -Diffusers layout)"),
    scheme: str = typer.Option("fp8", help="fp8 | int8 | int8_wo | nf4"),
    output: Path = typer.Option(None, "-o", "--output", help="folder for the quantized DiT (shards + manifest)"),
    lora: list[Path] = typer.Option([], help="LoRA .safetensors to merge before quantizing (repeatable)"),
    relighting_lora: bool = typer.Option(False, help="merge the checkpoint's relighting LoRA first"),
    report: bool = typer.Option(False, help="instead of writing: each scheme's per-layer and DiT-output error"),
    overwrite: bool = typer.Option(False),
):
    """Quantize the DiT offline, streaming tensor by tensor (a few GB of host memory at 14B)."""
    from .engine.errors import ValidationError, WanimateError

    try:
        if report:
            from .quant.report import checkpoint_accuracy_report
            typer.echo(checkpoint_accuracy_report(ckpt_dir).table)
            return
        if output is None:
            raise ValidationError("give -o OUT (the folder to write), or --report")
        from .quant.checkpoint import quantize_checkpoint
        loras = list(lora)
        if relighting_lora:
            from .engine.components import load_relighting_lora
            loras.append(load_relighting_lora(ckpt_dir))
        result = quantize_checkpoint(ckpt_dir, scheme, output, loras=loras, overwrite=overwrite,
                                     progress=lambda s: typer.echo(s, err=True))
    except WanimateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {output}: {result}")


@app.command()
def convert(ckpt_dir: Path = typer.Argument(..., help="the Wan2.2-Animate-14B checkpoint folder")):
    """Turn the checkpoint's pickles (.pth/.ckpt) into safetensors, in a child process with
    torch.load(weights_only=True), and write wanimate-manifest.json (SHA-256 of every weight file)."""
    from .engine.checkpoint import convert as run_convert
    from .engine.errors import WanimateError

    try:
        path = run_convert(ckpt_dir, progress=lambda s: typer.echo(s, err=True))
    except WanimateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {path}")


@app.command()
def inspect(ckpt_dir: Path = typer.Argument(..., help="a checkpoint folder (official or -Diffusers layout)")):
    """Report what a checkpoint folder holds, what is missing, and the GPU memory of each component."""
    from .engine.checkpoint import inspect as run_inspect
    from .engine.errors import WanimateError

    try:
        report = run_inspect(ckpt_dir)
    except WanimateError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(report.format())
    raise typer.Exit(0 if not report.missing else 1)


def main():  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
