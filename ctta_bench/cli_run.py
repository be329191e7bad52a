"""``ctta-bench run``'s terminal side: a rich progress bar per domain and the final table."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import CTTAError
from .runner import Interrupted, RunOptions, run


class RichReporter:
    """Progress per segment: running error and img/s, updated at most twice a second.

    No background refresh thread (``auto_refresh=False``): the bar redraws only when the runner
    reports (throttled to 2 Hz), so rendering never competes with the adaptation loop for the GIL.
    """

    def __init__(self, console: Console, quiet: bool = False):
        self.console = console
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("err {task.fields[err]:>6}"), TextColumn("{task.fields[ips]:>8} img/s"),
            TimeElapsedColumn(), console=console, transient=False, disable=quiet, auto_refresh=False,
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def note(self, text: str) -> None:
        self.progress.console.print(f"[yellow]note:[/] {text}")

    def start_segment(self, seg, total, done) -> None:
        label = f"r{seg.round} {seg.domain} s{seg.severity}"
        self.task = self.progress.add_task(label, total=total, completed=done, err="–", ips="–")
        self.progress.refresh()

    def update(self, done, errors, img_per_s) -> None:
        self.progress.update(self.task, completed=done, err=f"{100.0 * errors / max(done, 1):.1f}%",
                             ips=f"{img_per_s:.0f}")
        self.progress.refresh()

    def end_segment(self, row) -> None:
        self.progress.update(self.task, completed=self.progress.tasks[-1].total, err=f"{row['error']:.1f}%",
                             ips=f"{row['img_per_s']:.0f}")
        self.progress.refresh()


def results_table(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("#", "round", "domain", "sev", "n", "error %", "img/s", "peak MB"):
        t.add_column(col, justify="right" if col not in ("domain",) else "left")
    for r in rows:
        t.add_row(str(r["index"]), str(r["round"]), r["domain"], str(r["severity"]), str(r["n"]),
                  f"{r['error']:.2f}", f"{r['img_per_s']:.0f}", f"{r['peak_mem_mb']:.0f}")
    return t


def execute_run(opts: RunOptions, console: Console, quiet: bool = False) -> int:
    """Run and print; returns the exit code (CTTAErrors propagate to the CLI's handler)."""
    try:
        with RichReporter(console, quiet) as rep:
            result = run(opts, rep)
    except Interrupted as e:
        Console(stderr=True, highlight=False).print(f"[yellow]{escape(str(e))}[/]", soft_wrap=True)
        return e.exit_code
    s = result.summary
    title = f"{result.run_dir.parent.parent.name} · {result.run_dir.parent.name} · seed {opts.seed}"
    console.print(results_table(result.rows, title))
    if s["mean_error"] is None:
        raise CTTAError("the stream was empty: no rows written")
    console.print(f"[bold]mean error {s['mean_error']:.2f} %[/]  (over all {s['n']} samples: {s['error_all']:.2f} %)")
    console.print(f"run id [bold]{result.run_dir.name}[/]  →  {result.run_dir}", soft_wrap=True)
    return 0
