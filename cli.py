"""The `wanimate` command line: a thin typer app. Every command calls a typed library function
that tests and servers call directly; no logic lives only here."""
from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="wanimate: an optimized deployment engine for Wan2.2-Animate-14B.")


@app.command()
def verify(directory: Path = typer.Argument(..., help="a folder of parity fixtures (json + safetensors/npz)")):
    """Run every parity fixture in DIRECTORY against the engine; exit 1 if any fails."""
    from .engine.verify import format_table, verify as run_verify

    checks = run_verify(directory, progress=lambda s: typer.echo(s, err=True))
    typer.echo(format_table(checks))
    raise typer.Exit(0 if all(c.passed for c in checks) else 1)


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
