"""`proxyloop models ...`: prepare the base language models the workers train, offline.

Run: `proxyloop models prepare smollm2` or `proxyloop models prepare tiny`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ground.settings import get_settings

models_app = typer.Typer(help="Base language models: convert SmolLM2 from its wheel, build a tiny one.",
                         no_args_is_help=True)
console = Console()
MODEL_NAMES = ("smollm2", "tiny")


def models_dir() -> Path:
    return get_settings().home_dir / "models"


@models_app.command()
def prepare(
    name: Annotated[str, typer.Argument(help=f"One of {list(MODEL_NAMES)}.")],
    out: Annotated[Path | None, typer.Option(help="Directory for the model (default PROXYLOOP_HOME/models).")] = None,
) -> None:
    """Write a Hugging Face safetensors directory for NAME (once; later calls reuse it)."""
    from workers.lm.models import ModelNotPrepared, build_tiny, prepare_smollm2

    target = out or models_dir()
    if name not in MODEL_NAMES:
        console.print(f"[red]error:[/red] unknown model {name!r}; should be one of {list(MODEL_NAMES)}")
        raise typer.Exit(2)
    try:
        path = prepare_smollm2(target) if name == "smollm2" else build_tiny(target / "tiny")
    except ModelNotPrepared as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(str(path))
