"""`ctta-bench figures` and the figure functions: files are written, valid and non-empty."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from ctta_bench.report import figures, store, tables

try:
    from ._results_factory import gradual_segments, write_run
except ImportError:  # tests/ is not a package
    from _results_factory import gradual_segments, write_run

SRC = {"gaussian_noise": 72.3, "shot_noise": 65.7, "defocus_blur": 46.9, "fog": 26.0, "contrast": 46.7}
MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}


def _app() -> typer.Typer:
    """The real ``ctta-bench`` app, with its error handling."""
    from ctta_bench.cli import app

    return app


@pytest.fixture()
def root(tmp_path):
    r = tmp_path / "results"
    write_run(r, "toy-c", "source", 0, SRC, source_eval=True)
    for seed, f in [(0, 0.5), (1, 0.52)]:
        write_run(r, "toy-c", "tent", seed, {d: e * f for d, e in SRC.items()}, source_eval=True)
    write_run(r, "toy-c", "moase", 0, {d: e * 0.35 for d, e in SRC.items()}, source_eval=True)
    return r


def _assert_file(path, fmt):
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(MAGIC[fmt]), (path, data[:8])


def test_figures_command_writes_tables_and_every_figure(root, tmp_path):
    out = tmp_path / "paper"
    res = CliRunner().invoke(_app(), ["figures", "--root", str(root), "--suite", "toy-c", "--out", str(out),
                                      "--reference", "paper:cifar10-c", "--fig-format", "png,svg"])
    assert res.exit_code == 0, res.output
    for name in ("error_along_stream", "mean_error", "heatmap", "batch_error", "source_error"):
        _assert_file(out / f"{name}.png", "png")
        _assert_file(out / f"{name}.svg", "svg")
    tex = (out / "table.tex").read_text()
    assert r"\toprule" in tex and "moase" in tex and "CoTTA" in tex
    assert "| moase |" in (out / "table.md").read_text()
    assert "row,method,kind" in (out / "table.csv").read_text()
    assert "run_id" in (out / "runs.csv").read_text() and "moase" in (out / "runs.csv").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temp files were renamed


def test_pdf_output_and_multi_round_gradual_streams(tmp_path):
    r = tmp_path / "res"
    for m, f in [("source", 1.0), ("tent", 0.6)]:
        write_run(r, "toy-grad", m, 0, segments=gradual_segments({d: e * f for d, e in SRC.items()}, rounds=2, bump=2.0),
                  setting="gradual", rounds=2, batches=3)
    runs = store.select_runs(root=r)
    segs = store.load_segments(runs)
    table = tables.build_table(runs, segs)
    out = tmp_path / "figs"
    written = figures.write_figures(out, runs, segs, table, store.load_batches(runs), None, ["pdf"])
    assert {p.name for p in written} == {"error_along_stream.pdf", "mean_error.pdf", "heatmap.pdf", "batch_error.pdf"}
    for p in written:
        _assert_file(p, "pdf")


def test_mixed_streams_skip_the_along_the_stream_figure_with_a_note(tmp_path):
    r = tmp_path / "res"
    write_run(r, "toy-mix", "tent", 0, SRC, setting="mixed")
    runs = store.select_runs(root=r)
    segs = store.load_segments(runs)
    assert figures.stream_figure(segs, runs) is None
    notes: list[str] = []
    written = figures.write_figures(tmp_path / "f", runs, segs, tables.build_table(runs, segs),
                                    store.load_batches(runs), None, ["png"], notes=notes)
    assert "error_along_stream.png" not in {p.name for p in written}
    assert any("mixed" in n for n in notes)


def test_runs_without_batches_csv_get_no_batch_figure(tmp_path):
    r = tmp_path / "res"
    write_run(r, "toy-c", "tent", 0, SRC, batches=0)
    runs = store.select_runs(root=r)
    assert store.load_batches(runs) is None
    assert figures.batch_curve_figure(None, runs) is None


def test_palette_is_okabe_ito_with_source_in_grey():
    st = figures.label_styles(["source", "tent", "cotta"], ["source", "tent", "cotta"])
    assert st["source"]["color"] == figures.SOURCE_COLOR and st["source"]["linestyle"] == "--"
    assert [st["tent"]["color"], st["cotta"]["color"]] == figures.OKABE_ITO[:2]
    assert st["tent"]["marker"] != st["cotta"]["marker"]


def test_bad_figure_format_is_a_user_error(root, tmp_path):
    res = CliRunner().invoke(_app(), ["figures", "--root", str(root), "--out", str(tmp_path / "x"), "--fig-format", "gif"])
    assert res.exit_code == 2 and "--fig-format" in res.stderr
