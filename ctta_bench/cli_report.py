"""``ctta-bench compare | check | figures``: results folders → paper tables, CI gates, figures.

Registered on the main app by ``register(app)``. Only typer/rich are imported here; pandas and
matplotlib load inside the commands, so ``ctta-bench --help`` stays fast. See docs/reporting.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .errors import CTTAError

_ROOT_HELP = "Results root searched when no run folders are given."


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _print_notes(notes: list[str]) -> None:
    if notes:
        from rich.markup import escape

        err = _console(stderr=True)
        for n in dict.fromkeys(notes):
            err.print(f"[yellow]note:[/] {escape(n)}", soft_wrap=True)


def _select(paths, root, suite, method, seed, include_incomplete, notes):
    from .report import store

    plain = [m for m in method if "[" not in m]
    runs = store.select_runs(paths=paths or (), root=root, suite=suite, methods=plain, seeds=seed,
                             include_incomplete=include_incomplete, notes=notes)
    variants = [m for m in method if "[" in m]
    if variants:  # a variant label such as "tent [reset_each_shift]" selects that variant only
        runs = [r for r in runs if r.label in variants or r.method in plain]
        if not runs:
            raise CTTAError(f"no run is labelled {', '.join(variants)}; run `ctta-bench compare` to see the labels")
    suites = sorted({r.suite for r in runs})
    if len(suites) > 1:
        raise CTTAError(f"the selected runs come from several suites ({', '.join(suites)}); pick one with --suite")
    return runs


def _build(runs, reference, rounds, gradual, metric, std, precision, source_method, notes):
    from .report import store, tables
    from .report.reference import load_reference

    if metric is not None and metric not in store.METRICS:
        raise CTTAError(f"--metric must be one of {', '.join(store.METRICS)}, got '{metric}'")
    if precision < 0 or precision > 4:
        raise CTTAError(f"--precision must be 0..4 decimals, got {precision}")
    segs = store.load_segments(runs, metric)
    ref = load_reference(reference, runs[0].suite) if reference else None
    table = tables.build_table(runs, segs, rounds=rounds, gradual=gradual, source_method=source_method,
                               reference=ref, precision=precision, std=std, metric=metric)
    notes.extend(table.notes)
    table.notes = []  # printed once, on stderr / in the files
    return segs, table


# shared options (typer needs them spelled out per command)
def _opt_rounds():
    return typer.Option("rows", "--rounds", help="Multi-round streams: rows (a block of rows per round + all rounds) | columns (column groups per round).")


def _opt_gradual():
    return typer.Option("sev5", "--gradual", help="Gradual streams: sev5 (severity-5 segments, the standard CoTTA/MDTTA number) | per-severity | all.")


def register(app: typer.Typer) -> None:
    """Add ``compare``, ``check`` and ``figures`` to the ``ctta-bench`` app."""

    @app.command("compare")
    def compare(
        paths: Optional[List[Path]] = typer.Argument(None, help="Run folders or folders of runs (default: everything under --root).", show_default=False),
        root: Path = typer.Option(Path("results"), "--root", "-r", help=_ROOT_HELP),
        suite: Optional[str] = typer.Option(None, "--suite", "-s", help="Only runs of this suite."),
        method: List[str] = typer.Option([], "--method", "-m", help="Only these methods, in this row order (repeatable)."),
        seed: List[int] = typer.Option([], "--seed", help="Only these seeds (repeatable)."),
        fmt: str = typer.Option("rich", "--format", "-f", help="rich | markdown | latex | csv"),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file (atomically) instead of the terminal."),
        reference: Optional[str] = typer.Option(None, "--reference", help="Add published rows: 'paper' (this suite), 'paper:<suite>', or a YAML file."),
        rounds: str = _opt_rounds(),
        gradual: str = _opt_gradual(),
        metric: Optional[str] = typer.Option(None, "--metric", help="error | accuracy | miou (default: the suite's metric)."),
        std: str = typer.Option("all", "--std", help="Show ± std over seeds in: all cells | mean (the mean column only) | none."),
        precision: int = typer.Option(1, "--precision", help="Decimals shown (best is judged on shown values)."),
        source_method: str = typer.Option("source", "--source-method", help="The method the Gain column is measured against."),
        include_incomplete: bool = typer.Option(False, "--include-incomplete", help="Also use runs that are running, failed or interrupted."),
    ) -> None:
        """Method × domain table of error % (mean ± std over seeds, best marked, gain vs source).

        Examples:
          ctta-bench compare --suite cifar10-c --reference paper
          ctta-bench compare results/cifar10-c/tent results/cifar10-c/cotta --format latex -o table.tex
        """
        from .report import tables

        if fmt not in tables.FORMATS:
            raise CTTAError(f"--format must be one of {', '.join(tables.FORMATS)}, got '{fmt}'")
        notes: list[str] = []
        runs = _select(paths, root, suite, method, seed, include_incomplete, notes)
        _, table = _build(runs, reference, rounds, gradual, metric, std, precision, source_method, notes)
        if output is not None:
            table.notes = list(notes)
            tables.write_text_atomic(output, tables.render(table, fmt))
            _console(stderr=True).print(f"wrote {output} ({fmt}, {len(runs)} run(s))", soft_wrap=True)
        elif fmt == "rich":
            from .cli import print_wide

            print_wide(tables.render_rich(table))
        else:
            table.notes = list(notes) if fmt in ("markdown", "latex") else []
            typer.echo(tables.render(table, fmt), nl=False)
        _print_notes(notes)

    @app.command("check")
    def check(
        target: Path = typer.Argument(..., help="A run folder, a folder of runs of one method (seeds averaged), or a CSV table."),
        baseline: Optional[Path] = typer.Option(None, "--baseline", "-b", help="Reference table (CSV: domain, error [, round, severity], with a 'mean' row)."),
        tolerance: float = typer.Option(0.5, "--tolerance", "-t", help="Allowed difference in absolute percentage points."),
        two_sided: bool = typer.Option(False, "--two-sided", help="Also fail when better than the baseline by more than the tolerance."),
        write_baseline: Optional[Path] = typer.Option(None, "--write-baseline", help="Write TARGET's numbers as a baseline file instead of checking."),
        method: Optional[str] = typer.Option(None, "--method", "-m", help="Which method/variant when TARGET or the baseline holds several."),
        include_incomplete: bool = typer.Option(False, "--include-incomplete", help="Accept runs that did not complete (missing domains still fail)."),
        report: Optional[Path] = typer.Option(None, "--report", help="Also write the diff as Markdown (e.g. $GITHUB_STEP_SUMMARY)."),
    ) -> None:
        """Gate a run against a committed baseline: exit 0 within tolerance, 1 when worse or missing.

        Examples:
          ctta-bench check results/digits-c/tent/RUN --write-baseline results/reference/digits-c/tent.csv
          ctta-bench check results/digits-c/tent/RUN --baseline results/reference/digits-c/tent.csv -t 0.5
        """
        from .report import tables

        if (baseline is None) == (write_baseline is None):
            raise CTTAError("give exactly one of --baseline FILE (check) or --write-baseline FILE (create one)")
        notes: list[str] = []
        base = tables.read_table_file(baseline, method=None) if baseline is not None else None
        metric = base.metric if base is not None else None
        if target.is_file():
            actual = tables.read_table_file(target, method=method, what="table")
            if base is not None and actual.metric != base.metric:
                raise CTTAError(f"{target} reports {actual.metric} but the baseline is {base.metric}")
            lookup = tables.table_lookup(actual)
            suite, label, produced = actual.meta.get("suite"), actual.meta.get("method"), actual
        else:
            from .report import store

            runs = store.select_runs(paths=[target], include_incomplete=include_incomplete, notes=notes)
            if method:
                runs = [r for r in runs if r.method == method or r.label == method]
                if not runs:
                    raise CTTAError(f"no run of method '{method}' under {target}")
            suites = sorted({r.suite for r in runs})
            if len(suites) > 1:
                raise CTTAError(f"{target} holds runs of several suites ({', '.join(suites)}); pass one run folder")
            labels = list(dict.fromkeys(r.label for r in runs))
            if len(labels) > 1:
                raise CTTAError(f"{target} holds runs of several methods/variants ({', '.join(labels)}); pick one with --method")
            segs = store.load_segments(runs, metric)
            metric = metric or runs[0].metric
            produced = tables.baseline_from_runs(runs, segs, metric) if write_baseline is not None else None
            lookup = lambda rnd, sev, dom: tables.run_value(segs, metric, rnd, sev, dom)  # noqa: E731
            suite, label = runs[0].suite, labels[0]
            if len(runs) > 1:
                notes.append(f"{len(runs)} runs ({label}, seeds {', '.join(str(r.seed) for r in runs)}): their mean is checked")
        if write_baseline is not None:
            tables.write_text_atomic(write_baseline, tables.baseline_csv(produced))
            _console().print(f"wrote baseline {write_baseline} ({len(produced.rows)} rows, {produced.metric}); "
                             f"commit it and gate with: ctta-bench check RUN --baseline {write_baseline}", soft_wrap=True)
            _print_notes(notes)
            return
        b_suite, b_method = base.meta.get("suite"), base.meta.get("method")
        if b_suite and suite and b_suite != suite:
            raise CTTAError(f"the baseline {baseline} is for suite '{b_suite}' but {target} is '{suite}'; "
                            "use the matching baseline")
        if b_method and label and b_method != label:
            notes.append(f"the baseline was written for '{b_method}', the checked results are '{label}'")
        res = tables.compare_to_baseline(lookup, base, tolerance=tolerance, two_sided=two_sided)
        notes.extend(res.notes)
        out = _console()
        out.print(tables.render_check_rich(res))
        colour = "bold green" if res.passed else "bold red"
        from rich.markup import escape

        out.print(f"[{colour}]{escape(res.summary)}[/]", soft_wrap=True)
        if report is not None:
            tables.write_text_atomic(report, tables.render_check_markdown(res))
        _print_notes(notes)
        raise typer.Exit(0 if res.passed else 1)

    @app.command("figures")
    def figures(
        paths: Optional[List[Path]] = typer.Argument(None, help="Run folders or folders of runs (default: everything under --root).", show_default=False),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the table files and figures (created)."),
        root: Path = typer.Option(Path("results"), "--root", "-r", help=_ROOT_HELP),
        suite: Optional[str] = typer.Option(None, "--suite", "-s", help="Only runs of this suite."),
        method: List[str] = typer.Option([], "--method", "-m", help="Only these methods, in this order (repeatable)."),
        seed: List[int] = typer.Option([], "--seed", help="Only these seeds (repeatable)."),
        reference: Optional[str] = typer.Option(None, "--reference", help="Add published rows: 'paper', 'paper:<suite>' or a YAML file."),
        fig_format: str = typer.Option("png,pdf", "--fig-format", help="Comma list of png, pdf, svg."),
        rounds: str = _opt_rounds(),
        gradual: str = _opt_gradual(),
        metric: Optional[str] = typer.Option(None, "--metric", help="error | accuracy | miou (default: the suite's metric)."),
        std: str = typer.Option("all", "--std", help="± std over seeds in: all | mean | none."),
        precision: int = typer.Option(1, "--precision", help="Decimals shown."),
        source_method: str = typer.Option("source", "--source-method", help="The method the Gain column is measured against."),
        smooth: Optional[int] = typer.Option(None, "--smooth", help="Rolling window (batches) of the per-batch curve (default: automatic)."),
        include_incomplete: bool = typer.Option(False, "--include-incomplete", help="Also use runs that did not complete."),
    ) -> None:
        """Paper table (LaTeX + Markdown + CSV) and all figures of one suite, in one folder.

        Example: ctta-bench figures --root results --suite digits-c --out paper/digits-c --reference paper
        """
        from .report import figures as figs
        from .report import store, tables

        formats = figs.parse_formats(fig_format)
        if smooth is not None and smooth < 1:
            raise CTTAError(f"--smooth must be >= 1 batch, got {smooth}")
        notes: list[str] = []
        runs = _select(paths, root, suite, method, seed, include_incomplete, notes)
        segs, table = _build(runs, reference, rounds, gradual, metric, std, precision, source_method, notes)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CTTAError(f"cannot create {out} ({e.strerror}); choose another --out") from None
        table.notes = list(notes)
        written = []
        for name, fmt in (("table.tex", "latex"), ("table.md", "markdown"), ("table.csv", "csv")):
            tables.write_text_atomic(out / name, tables.render(table, fmt))
            written.append(out / name)
        tables.write_text_atomic(out / "runs.csv", _runs_csv(runs))
        written.append(out / "runs.csv")
        batches = store.load_batches(runs)
        source_eval = store.load_source_eval(runs)
        written += figs.write_figures(out, runs, segs, table, batches, source_eval, formats, smooth, notes)
        con = _console()
        con.print(f"[bold]{len(written)} files[/] in {out} from {len(runs)} run(s) of {runs[0].suite}:")
        for p in written:
            con.print(f"  {p.name}")
        _print_notes(notes)


def _runs_csv(runs) -> str:
    """Provenance of a figures folder: which run folders (and code versions) made it."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["label", "method", "seed", "status", "run_id", "git_sha", "created", "finished", "path"])
    for r in runs:
        m = r.manifest
        w.writerow([r.label, r.method, r.seed, r.status, r.run_id, m.get("git_sha") or "", m.get("created") or "",
                    m.get("finished") or "", str(r.path)])
    return buf.getvalue()
