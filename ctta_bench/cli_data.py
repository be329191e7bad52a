"""``ctta-bench make-corrupted``: build a -C data set (CIFAR-10-C/ImageNet-C layout) from clean data.

Registered on the main app by ``register(app)``; the work is in :mod:`ctta_bench.data.corruptions`
(imported inside the command so ``ctta-bench --help`` stays fast).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def make_corrupted_command(
    src: Path = typer.Argument(..., help="Clean data: a CIFAR python test batch folder / test_images.npy + "
                               "test_labels.npy (arrays), or a folder of class folders with images (folder)."),
    out: Path = typer.Argument(..., help="Output folder (CIFAR-10-C or ImageNet-C layout)."),
    corruptions: Optional[str] = typer.Option(None, "--corruptions", "-c",
                                              help="Comma-separated corruptions (full or short names); default: all 15."),
    severities: str = typer.Option("1,2,3,4,5", "--severities", help="Comma-separated severities in 1..5."),
    seed: int = typer.Option(0, "--seed", help="Seed: every image gets its own seed derived from it."),
    fmt: str = typer.Option("auto", "--format", help="auto | arrays (CIFAR-C .npy) | folder (ImageNet-C JPEGs)."),
    params: str = typer.Option("auto", "--params",
                               help="Parameter table: cifar (make_cifar_c.py) | imagenet (ImageNet-C) | auto (cifar for ≤ 64 px)."),
    workers: int = typer.Option(1, "--workers", "-j", help="Processes corrupting images in parallel."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Folder format: resize the shorter side first (ImageNet-C: 256)."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Folder format: center crop after resizing (ImageNet-C: 224)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Build a -C data set: 15 corruptions × severities in the exact published layout.

    Example: ctta-bench make-corrupted data/cifar-10-batches-py data/CIFAR-10-C
    """
    from rich.console import Console

    from .data.corruptions import make_corrupted

    console = Console(highlight=False)
    if quiet:
        path = make_corrupted(src, out, corruptions, severities, fmt=fmt, seed=seed, params=params,
                              workers=workers, resize=resize, crop=crop)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("corrupting", total=None)

            def progress(done: int, total: int, what: str) -> None:
                bar.update(task, completed=done, total=total, description=what)

            path = make_corrupted(src, out, corruptions, severities, fmt=fmt, seed=seed, progress=progress,
                                  params=params, workers=workers, resize=resize, crop=crop)
    console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    """Add ``make-corrupted`` to the ``ctta-bench`` app."""
    app.command("make-corrupted")(make_corrupted_command)
