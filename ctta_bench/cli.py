"""The ``ctta-bench`` command line (Typer + rich).

Every user error is a :class:`CTTAError`: printed as one red line, exit code non-zero, no
traceback. Commands from other modules (data, reports, bench) register themselves through a
``register(app)`` function listed in ``_COMMAND_MODULES``.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import CTTAError


class _Group(typer.core.TyperGroup):
    """Every command's :class:`CTTAError` becomes one red line on stderr and its exit code, on
    every way in (console script, ``python -m``, typer's test runner)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CTTAError as e:
            print_error(e)
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(
    cls=_Group,
    name="ctta-bench",
    help="Benchmark harness for continual test-time adaptation (CTTA).\n\n"
    "Run a method on a suite, compare runs, gate regressions in CI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

_COMMAND_MODULES = ["ctta_bench.cli_data", "ctta_bench.cli_report", "ctta_bench.cli_bench"]


def _offline_defaults() -> None:
    # never hang on a hub download: timm/huggingface fail in ~1 s instead of retrying for ~47 s
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@app.command()
def run(
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Method name (see `ctta-bench methods`); default: the suite's default_method."),
    suite: str = typer.Option("digits-c", "--suite", "-s", help="Suite name (see `ctta-bench suites`) or path to a suite YAML."),
    seed: int = typer.Option(0, help="Seed for the stream order, initialisation and adaptation randomness."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]"),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Results root; the run goes to OUT/<suite>/<method>/<run-id>/."),
    set_: List[str] = typer.Option([], "--set", help="Override a suite field or method hyperparameter, e.g. --set batch_size=64 --set tent.lr=5e-4 (repeatable)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="The CIFAR-10-C/ImageNet-C folder or its parent (overrides the suite's dataset.root and $CTTA_DATA)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this run folder."),
    force: bool = typer.Option(False, "--force", help="With --resume: resume even if the code version or config changed."),
    amp: Optional[str] = typer.Option(None, "--amp", help="Mixed precision on GPU: bf16 | fp16 (off by default; changes numerics)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last memory format (GPU speed-up for CNNs)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model (falls back with a message where unsupported)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; only the final table."),
) -> None:
    """Run a CTTA method on a suite's domain stream and write tidy results.

    Example: ctta-bench run --method tent --suite digits-c --set batch_size=32
    """
    _offline_defaults()
    from .cli_run import execute_run
    from .runner import RunOptions

    opts = RunOptions(
        suite=suite, method=method, seed=seed, device=device, out=out, overrides=list(set_),
        data_root=data_root, resume=resume, force=force, amp=amp, channels_last=channels_last,
        compile=compile_,
    )
    code = execute_run(opts, console, quiet=quiet)
    raise typer.Exit(code)


@app.command("methods")
def list_methods() -> None:
    """List the registered methods (built-in and plugins) with a one-line summary."""
    from rich.table import Table

    from . import registry

    table = Table(title="methods", show_lines=False)
    table.add_column("name", style="bold cyan")
    table.add_column("works on")
    table.add_column("summary")
    for name, cls in sorted(registry.methods().items()):
        table.add_row(name, "ViT" if cls.requires == "vit" else "any", cls.summary)
    print_wide(table)


@app.command("suites")
def list_suites() -> None:
    """List the suites: dataset, model, number of domains, setting."""
    from rich.table import Table

    from .config import available_suites, build_suite, load_suite_dict

    table = Table(title="suites")
    for col in ("name", "dataset", "model", "#domains", "setting"):
        table.add_column(col, style="bold cyan" if col == "name" else None, no_wrap=True)
    table.add_column("description", max_width=60)
    for name, path in sorted(available_suites().items()):
        try:
            s = build_suite(load_suite_dict(str(path)))
        except CTTAError as e:
            table.add_row(name, "[red]invalid[/]", "", "", "", str(e))
            continue
        n = _count_domains(s)
        extra = f" ×{s.rounds} rounds" if s.rounds > 1 else ""
        table.add_row(name, s.dataset.kind, f"{s.model.source}:{s.model.name}", n, s.setting + extra, s.description)
    print_wide(table)


def print_error(e: CTTAError) -> None:
    """The one form of every user error: one red, soft-wrapped line on stderr."""
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)


def print_wide(renderable) -> None:
    """Print at the renderable's natural width even on a narrow terminal or a CI log (never
    elide names or numbers); long free-text columns carry a max_width and wrap instead."""
    need = console.measure(renderable, options=console.options.update(width=400)).maximum
    out = console if need <= console.width else Console(highlight=False, width=need)
    out.print(renderable)


def _count_domains(s) -> str:
    from .data.domains import CORRUPTIONS, resolve_domains

    if isinstance(s.domains, list):
        return str(len(s.domains))
    if s.dataset.kind == "digits-c":
        from .data.digit_corruptions import DIGIT_CORRUPTIONS

        return str(len(resolve_domains(s.domains, list(DIGIT_CORRUPTIONS))))
    try:
        return str(len(resolve_domains(s.domains, CORRUPTIONS)))
    except CTTAError:
        return "?"


def _register_plugins() -> None:
    for mod in _COMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        m.register(app)


_register_plugins()


def main() -> None:
    try:
        app()
    except CTTAError as e:  # raised outside a command (option parsing callbacks, plugin loading)
        print_error(e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
