"""``ctta-bench bench``: per-method cost (img/s, time split, passes, syncs, memory, parameters).

Registered on the main app by ``register(app)``; torch loads inside the command, so
``ctta-bench --help`` stays fast. See docs/performance.md for how the numbers are measured.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .errors import CTTAError


def _parse_hyperparameters(assignments: list[str]) -> dict[str, dict]:
    """``["tent.lr=5e-4", "cotta.aug_chunk=8"]`` → ``{"tent": {"lr": 5e-4}, "cotta": {"aug_chunk": 8}}``."""
    from .config import parse_assignment

    out: dict[str, dict] = {}
    for text in assignments:
        path, value = parse_assignment(text)
        if len(path) != 2:
            raise CTTAError(f"--set {text}: bench overrides look like <method>.<hyperparameter>=value")
        out.setdefault(path[0], {})[path[1]] = value
    return out


def bench(
    methods: str = typer.Option("all", "--methods", "-m", help="Comma-separated method names, or 'all' (every registered method)."),
    model: str = typer.Option("small_cnn", "--model", help="small_cnn | tiny_vit | any timm model name (random weights, pretrained=False)."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per adaptation step."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    steps: int = typer.Option(10, help="Timed adaptation steps per method."),
    warmup: int = typer.Option(3, help="Untimed steps before timing (allocations, kernel selection)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Input size; default: the model's (32 for the built-ins)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Classifier outputs; default: 10 for the built-ins, the timm model's own otherwise."),
    seed: int = typer.Option(0, help="Seed for the model weights and the synthetic input."),
    set_: List[str] = typer.Option([], "--set", help="Method hyperparameter, e.g. --set cotta.aug_chunk=8 (repeatable)."),
    amp: Optional[str] = typer.Option(None, "--amp", help="Mixed precision on GPU: bf16 | fp16 (off by default; changes numerics)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last memory format for model and input."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile each model copy (GPU path; eager elsewhere, with a note)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice; 1 gives steadier numbers on a busy machine)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also save the table: FILE.csv or FILE.json (with run metadata)."),
) -> None:
    """Measure the cost of each method's adaptation step on synthetic input.

    Example: ctta-bench bench --methods source,norm,tent,cotta --model small_cnn --batch-size 64 --out bench.csv
    """
    import os

    from rich.console import Console
    from rich.markup import escape

    from .bench import BenchOptions, run_bench, save, table
    from .cli import print_wide

    # a CTTAError propagates to ctta_bench.cli.main: one red line and its exit code
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    err = Console(stderr=True, highlight=False)

    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise CTTAError(f"--out must end in .csv or .json, got {out.name}")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    opts = BenchOptions(
        methods=[] if names == ["all"] else names, model=model, batch_size=batch_size, device=device,
        steps=steps, warmup=warmup, image_size=image_size, num_classes=num_classes, seed=seed,
        amp=amp, channels_last=channels_last, compile=compile_, threads=threads,
        hyperparameters=_parse_hyperparameters(list(set_)),
    )
    result = run_bench(opts, progress=lambda n: err.print(f"[dim]measuring {escape(n)} …[/]"))
    m = result.meta
    title = (f"bench · {m['model']} · {m['image_size']}px · batch {m['batch_size']} · {m['device']} · "
             f"{m['steps']} steps after {m['warmup']} warm-up")
    print_wide(table(result, title))
    for note in dict.fromkeys(result.notes):
        err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    for r in result.rows:
        if r["note"]:
            err.print(f"[yellow]note:[/] {escape(r['method'])}: {escape(r['note'])}", soft_wrap=True)
    if out is not None:
        save(result, out)
        Console(highlight=False).print(f"saved → {out}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
