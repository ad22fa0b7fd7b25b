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


def main():  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
