"""`ctta-bench compare`: hand-made results folders with known numbers → known table cells."""
from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from ctta_bench.report import reference, store, tables

try:
    from ._results_factory import gradual_segments, write_run
except ImportError:  # tests/ is not a package
    from _results_factory import gradual_segments, write_run

SRC = {"gaussian_noise": 72.3, "shot_noise": 65.7, "defocus_blur": 46.9, "fog": 26.0, "contrast": 46.7}
TENT = {"gaussian_noise": 30.0, "shot_noise": 28.0, "defocus_blur": 14.0, "fog": 12.0, "contrast": 16.0}
COTTA = {"gaussian_noise": 25.0, "shot_noise": 29.0, "defocus_blur": 12.0, "fog": 12.0, "contrast": 11.0}


def _app() -> typer.Typer:
    """The real ``ctta-bench`` app, with its error handling."""
    from ctta_bench.cli import app

    return app


def _invoke(*args):
    return CliRunner().invoke(_app(), [str(a) for a in args])


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "results"
    write_run(r, "toy-c", "source", 0, SRC)
    for seed, shift in [(0, 0.0), (1, 1.0), (2, -1.0)]:
        write_run(r, "toy-c", "tent", seed, {d: e + shift for d, e in TENT.items()})
    write_run(r, "toy-c", "cotta", 0, COTTA)
    return r


def _table(root, **kw):
    runs = store.select_runs(root=root, suite=kw.pop("suite", "toy-c"), include_incomplete=kw.pop("include_incomplete", False))
    segs = store.load_segments(runs)
    return tables.build_table(runs, segs, **kw)


def _row(table, label, block=None):
    rows = [r for r in table.rows if r.label == label and (block is None or r.block == block)]
    assert len(rows) == 1, [r.label for r in table.rows]
    return rows[0]


def test_known_numbers_give_known_cells_mean_and_gain(root):
    t = _table(root)
    assert [r.label for r in t.rows] == ["source", "tent", "cotta"]
    assert [c.domain for c in t.columns] == list(SRC) + ["mean"]
    src = _row(t, "source")
    assert src.cells[(0, "fog")].mean == pytest.approx(26.0)
    assert src.mean.mean == pytest.approx(sum(SRC.values()) / 5)
    cotta = _row(t, "cotta")
    assert cotta.mean.mean == pytest.approx(sum(COTTA.values()) / 5)
    assert cotta.gain == pytest.approx(sum(SRC.values()) / 5 - sum(COTTA.values()) / 5)
    assert src.gain is None and t.show_gain


def test_seeds_are_aggregated_as_mean_and_sample_std(root):
    tent = _row(_table(root), "tent")
    cell = tent.cells[(0, "gaussian_noise")]
    assert cell.n == 3 and cell.mean == pytest.approx(30.0) and cell.std == pytest.approx(1.0)
    assert tent.mean.mean == pytest.approx(sum(TENT.values()) / 5) and tent.mean.std == pytest.approx(1.0)
    assert sorted(tent.seeds) == [0, 1, 2]


def test_best_value_per_column_is_marked_with_ties(root):
    t = _table(root)
    tent, cotta, src = _row(t, "tent"), _row(t, "cotta"), _row(t, "source")
    assert (0, "gaussian_noise") in cotta.best and (0, "gaussian_noise") not in tent.best
    assert (0, "shot_noise") in tent.best                    # 28.0 < 29.0
    assert (0, "fog") in tent.best and (0, "fog") in cotta.best  # tie at 12.0: both bold
    assert (0, "mean") in cotta.best and not src.best
    md = tables.render_markdown(t)
    assert "| cotta | **25.0** | 29.0 |" in md
    assert "**12.0 ± 1.0**" in md


def test_markdown_latex_csv_carry_the_same_numbers(root):
    t = _table(root)
    tex = tables.render_latex(t)
    assert r"\textbf{25.0}" in tex and r"30.0\,{\scriptsize$\pm$1.0}" in tex
    import pandas as pd

    df = pd.read_csv(io.StringIO(tables.render_csv(t)))
    tent_mean = df[(df["row"] == "tent") & (df["domain"] == "mean")].iloc[0]
    assert tent_mean["error"] == pytest.approx(20.0) and tent_mean["std"] == pytest.approx(1.0)
    assert tent_mean["n_seeds"] == 3
    assert df[(df["row"] == "cotta") & (df["domain"] == "gaussian_noise")]["best"].item() == 1


def _check_latex_structure(tex: str) -> None:
    body = "\n".join(l for l in tex.splitlines() if not l.lstrip().startswith("%"))
    depth = 0
    for ch in body.replace(r"\{", "").replace(r"\}", ""):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0, "closing brace before opening"
    assert depth == 0, "unbalanced braces"
    for cmd in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{tabular}"):
        assert cmd in body
    assert body.index(r"\toprule") < body.index(r"\midrule") < body.index(r"\bottomrule")
    spec = re.search(r"\\begin\{tabular\}\{([^}]*)\}", body).group(1)
    ncols = len(re.findall(r"[lcr]", spec))
    rows = body.split(r"\toprule", 1)[1].split(r"\bottomrule", 1)[0]
    for line in rows.split(r"\\"):
        line = re.sub(r"\\(mid|top|bottom)rule|\\cmidrule\(lr\)\{[^}]*\}", "", line).strip()
        if not line:
            continue
        spans = [int(k) for k in re.findall(r"\\multicolumn\{(\d+)\}", line)]
        cells = line.count("&") + 1
        assert cells - len(spans) + sum(spans) == ncols, line
    assert "_" not in re.sub(r"\\_", "", body), "unescaped underscore"


def test_latex_is_a_structurally_valid_booktabs_fragment(root, tmp_path):
    write_run(root, "toy-c", "tent", 7, {d: e - 3 for d, e in TENT.items()}, setting="reset_each_shift",
              run_id="reset-run")
    t = _table(root, reference=reference.load_reference("paper:cifar10-c", "toy-c"))
    _check_latex_structure(tables.render_latex(t))
    # grouped round columns: \multicolumn headers + \cmidrule
    r3 = tmp_path / "r3"
    for m, f in [("source", 1.0), ("tent", 0.5)]:
        write_run(r3, "toy-3r", m, 0, {d: e * f for d, e in SRC.items()}, rounds=3)
    t3 = _table(r3, suite="toy-3r", rounds="columns")
    tex = tables.render_latex(t3)
    assert r"\multicolumn{6}{c}{Round 1}" in tex and r"\cmidrule(lr){2-7}" in tex
    _check_latex_structure(tex)


def test_runs_of_one_method_with_different_protocols_are_separate_rows(root):
    write_run(root, "toy-c", "tent", 0, {d: e - 3 for d, e in TENT.items()}, setting="reset_each_shift",
              run_id="reset-run")
    write_run(root, "toy-c", "tent", 0, TENT, hyperparameters={"lr": 0.01}, run_id="lr-run")
    labels = [r.label for r in _table(root).rows]
    assert "tent [continual, lr=0.001]" in labels and "tent [reset_each_shift, lr=0.001]" in labels
    assert "tent [continual, lr=0.01]" in labels
    reset = _row(_table(root), "tent [reset_each_shift, lr=0.001]")
    assert reset.mean.n == 1 and reset.mean.mean == pytest.approx(sum(TENT.values()) / 5 - 3)


def test_incomplete_runs_are_skipped_unless_asked(root):
    write_run(root, "toy-c", "norm", 0, {"gaussian_noise": 40.0}, status="failed")
    assert "norm" not in [r.label for r in _table(root).rows]
    t = _table(root, include_incomplete=True)
    norm = _row(t, "norm")
    assert norm.incomplete and not norm.mean.ok  # lacks domains: no mean rather than a wrong one
    assert "(incomplete)" in tables.render_markdown(t)


def test_rounds_get_a_block_per_round_plus_all_rounds(tmp_path):
    r = tmp_path / "res"
    segs = [{"round": k, "domain": d, "severity": 5, "error": e + 2 * (k - 1)} for k in (1, 2) for d, e in TENT.items()]
    write_run(r, "toy-2r", "tent", 0, segments=segs, rounds=2)
    write_run(r, "toy-2r", "source", 0, SRC, rounds=2)
    t = _table(r, suite="toy-2r")
    assert [b for b, _ in t.blocks()] == ["Round 1", "Round 2", "All rounds"]
    assert _row(t, "tent", "Round 2").cells[(0, "fog")].mean == pytest.approx(14.0)
    assert _row(t, "tent", "All rounds").cells[(0, "fog")].mean == pytest.approx(13.0)
    assert _row(t, "tent", "Round 2").gain == pytest.approx(sum(SRC.values()) / 5 - sum(TENT.values()) / 5 - 2)
    tc = _table(r, suite="toy-2r", rounds="columns")
    tent = _row(tc, "tent")
    assert tent.cells[(2, "fog")].mean == pytest.approx(14.0)
    assert tent.cells[(2, "mean")].mean == pytest.approx(sum(TENT.values()) / 5 + 2)
    assert tent.cells[(0, "mean")].mean == pytest.approx(sum(TENT.values()) / 5 + 1)


def test_gradual_reports_severity_5_by_default_and_per_severity_on_request(tmp_path):
    r = tmp_path / "res"
    write_run(r, "toy-grad", "tent", 0, segments=gradual_segments(TENT, bump=2.0), setting="gradual")
    t = _table(r, suite="toy-grad")
    tent = _row(t, "tent")
    assert tent.cells[(0, "gaussian_noise")].mean == pytest.approx(30.0)
    assert tent.mean.mean == pytest.approx(sum(TENT.values()) / 5)
    ps = _table(r, suite="toy-grad", gradual="per-severity")
    assert [b for b, _ in ps.blocks()] == [f"Severity {s}" for s in range(1, 6)]
    assert _row(ps, "tent", "Severity 1").cells[(0, "fog")].mean == pytest.approx(12.0 - 8.0)
    pooled = _row(_table(r, suite="toy-grad", gradual="all"), "tent")
    # shot_noise (not first): severities 1,2,3,4,5,4,3,2,1 with bumps 8,6,4,2,0,2,4,6,8 → mean 28 - 40/9
    assert pooled.cells[(0, "shot_noise")].mean == pytest.approx(28.0 - 40 / 9, abs=0.01)


def test_mixed_stream_has_an_all_samples_column(tmp_path):
    r = tmp_path / "res"
    write_run(r, "toy-mix", "tent", 0, TENT, setting="mixed")
    t = _table(r, suite="toy-mix")
    tent = _row(t, "tent")
    assert [c.domain for c in t.columns][-2:] == ["all", "mean"]
    assert tent.cells[(0, "all")].mean == pytest.approx(sum(TENT.values()) / 5)  # equal n per domain
    assert tent.cells[(0, "defocus_blur")].mean == pytest.approx(14.0)


def test_published_rows_come_with_their_citation(root):
    t = _table(root, reference=reference.load_reference("paper:cifar10-c", "toy-c"))
    pub = [r for r in t.rows if r.kind == "published"]
    cotta = next(r for r in pub if r.label == "CoTTA")
    assert cotta.mean.mean == pytest.approx(16.2) and cotta.cells[(0, "fog")].mean == pytest.approx(12.4)
    assert "CoTTA" in t.citations[cotta.citation - 1]
    assert not any(r.best for r in pub)                      # best is judged among measured runs
    assert any("15 domains" in n for n in t.notes)           # means over different domain sets are flagged
    md = tables.render_markdown(t)
    assert "CoTTA [1]" in md and "[1] Wang et al." in md


def test_shipped_per_domain_rows_average_to_their_published_means():
    data = reference.published_data()
    for key, block in data.items():
        ref = reference.parse_block(key, block, "published.yaml")
        assert ref.rows, key
        for row in ref.rows:
            assert row.citation and row.citation != "published.yaml", (key, row.label)
            if row.values:
                assert len(row.values) == 15
                assert sum(row.values.values()) / 15 == pytest.approx(row.mean, abs=0.06), (key, row.label)
    assert {"cifar10-c", "cifar100-c", "imagenet-c", "cifar10-c-vit", "cifar100-c-vit", "imagenet-c-vit"} <= set(data)


def test_compare_cli_writes_each_format_atomically(root, tmp_path):
    for fmt, marker in [("markdown", "| Method |"), ("latex", r"\toprule"), ("csv", "row,method,kind"), ("rich", "Method")]:
        out = tmp_path / "out" / f"table.{fmt}"
        res = _invoke("compare", "--root", root, "--format", fmt, "--output", out)
        assert res.exit_code == 0, res.output
        assert marker in out.read_text()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_compare_cli_prints_and_selects_by_method_and_seed(root):
    res = _invoke("compare", "--root", root, "--format", "markdown", "--method", "tent", "--seed", "1")
    assert res.exit_code == 0, res.output
    assert "| tent | 31.0 |" in res.stdout and "cotta" not in res.stdout
    res = _invoke("compare", root / "toy-c" / "cotta", root / "toy-c" / "source", "--reference", "paper:cifar10-c")
    assert res.exit_code == 0, res.output
    assert "cotta" in res.stdout and "CoTTA [1]" in res.stdout


def test_compare_cli_user_errors_are_one_red_line_and_exit_2(root, tmp_path):
    res = _invoke("compare", "--root", tmp_path / "nowhere")
    assert res.exit_code == 2 and "no results folder" in res.stderr and "Traceback" not in res.output
    res = _invoke("compare", "--root", root, "--suite", "nope")
    assert res.exit_code == 2 and "found: toy-c/" in res.stderr
    res = _invoke("compare", "--root", root, "--reference", "paper")
    assert res.exit_code == 2 and "no published numbers for suite 'toy-c'" in res.stderr
    write_run(root, "other-c", "tent", 0, TENT)
    res = _invoke("compare", "--root", root)
    assert res.exit_code == 2 and "several suites" in res.stderr
    res = _invoke("compare", "--root", root, "--suite", "toy-c", "--format", "html")
    assert res.exit_code == 2 and "--format" in res.stderr


def test_registering_the_commands_imports_neither_pandas_nor_matplotlib():
    code = ("import sys, typer; from ctta_bench.cli_report import register; register(typer.Typer()); "
            "print(any(m in sys.modules for m in ('pandas', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
