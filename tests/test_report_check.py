"""`ctta-bench check`: a run against a committed baseline; exit 0 within tolerance, 1 outside."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner


try:
    from ._results_factory import gradual_segments, write_run
except ImportError:  # tests/ is not a package
    from _results_factory import gradual_segments, write_run

TENT = {"gaussian_noise": 30.0, "shot_noise": 28.0, "defocus_blur": 14.0, "fog": 12.0, "contrast": 16.0}
MEAN = sum(TENT.values()) / 5  # 20.0


def _app() -> typer.Typer:
    """The real ``ctta-bench`` app, with its error handling."""
    from ctta_bench.cli import app

    return app


def _check(*args):
    return CliRunner().invoke(_app(), ["check", *map(str, args)])


@pytest.fixture()
def baseline(tmp_path):
    run = write_run(tmp_path / "ref", "toy-c", "tent", 0, TENT)
    path = tmp_path / "reference" / "toy-c" / "tent.csv"
    res = _check(run, "--write-baseline", path)
    assert res.exit_code == 0, res.output
    return path


def _run(tmp_path, errors, name="new", **kw):
    return write_run(tmp_path / name, "toy-c", "tent", 0, errors, **kw)


def test_written_baseline_has_a_row_per_domain_and_a_mean(baseline):
    text = baseline.read_text()
    assert "# suite: toy-c" in text and "# method: tent" in text
    lines = [l for l in text.splitlines() if not l.startswith("#")]
    assert lines[0] == "round,severity,domain,error"
    assert "1,5,gaussian_noise,30.0000" in lines and ",,mean,20.0000" in lines
    assert len(lines) == 1 + 5 + 1


def test_same_numbers_pass(tmp_path, baseline):
    res = _check(_run(tmp_path, TENT), "--baseline", baseline)
    assert res.exit_code == 0, res.output
    assert "PASS" in res.stdout


def test_worse_within_tolerance_passes_and_beyond_fails_with_a_diff(tmp_path, baseline):
    slightly = {**TENT, "fog": 12.4}
    assert _check(_run(tmp_path, slightly, "a"), "--baseline", baseline, "--tolerance", 0.5).exit_code == 0
    worse = {**TENT, "fog": 13.5}
    res = _check(_run(tmp_path, worse, "b"), "--baseline", baseline, "--tolerance", 0.5)
    assert res.exit_code == 1
    assert "WORSE" in res.stdout and "fog" in res.stdout and "+1.50" in res.stdout
    assert "FAIL: 1 worse than the baseline by more than 0.5 pp" in res.stdout
    # a wider tolerance lets the same run pass
    assert _check(_run(tmp_path, worse, "c"), "--baseline", baseline, "-t", 2).exit_code == 0


def test_exactly_at_the_tolerance_passes(tmp_path, baseline):
    res = _check(_run(tmp_path, {**TENT, "fog": 12.5}), "--baseline", baseline, "--tolerance", 0.5)
    assert res.exit_code == 0, res.output


def test_improvement_beyond_tolerance_passes_but_is_reported_and_fails_two_sided(tmp_path, baseline):
    better = {**TENT, "gaussian_noise": 25.0}
    res = _check(_run(tmp_path, better, "a"), "--baseline", baseline)
    assert res.exit_code == 0 and "better" in res.stdout and "--write-baseline" in res.stdout
    res = _check(_run(tmp_path, better, "b"), "--baseline", baseline, "--two-sided")
    assert res.exit_code == 1 and "two-sided" in res.stdout


def test_missing_domain_fails_with_a_clear_message(tmp_path, baseline):
    partial = {d: e for d, e in TENT.items() if d != "contrast"}
    res = _check(_run(tmp_path, partial), "--baseline", baseline)
    assert res.exit_code == 1
    assert "MISSING" in res.stdout and "contrast" in res.stdout and "1 missing" in res.stdout


def test_seeds_in_a_folder_are_averaged(tmp_path, baseline):
    for seed, d in [(0, 0.6), (1, -0.6)]:
        write_run(tmp_path / "seeds", "toy-c", "tent", seed, {k: v + d for k, v in TENT.items()})
    res = _check(tmp_path / "seeds", "--baseline", baseline, "-t", 0.1)
    assert res.exit_code == 0, res.output


def test_hand_written_baseline_without_round_or_severity(tmp_path):
    base = tmp_path / "b.csv"
    base.write_text("domain,error\ngaussian_noise,30.2\nfog,11.0\nmean,20.1\n")
    res = _check(_run(tmp_path, TENT), "--baseline", base)
    assert res.exit_code == 1 and "fog" in res.stdout  # fog 12.0 vs 11.0: 1 pp worse
    res = _check(_run(tmp_path, TENT, "b"), "--baseline", base, "-t", 1.0)
    assert res.exit_code == 0, res.output


def test_gradual_baseline_mean_is_the_severity_5_mean(tmp_path):
    run = write_run(tmp_path / "g", "toy-grad", "tent", 0, segments=gradual_segments(TENT, bump=2.0), setting="gradual")
    base = tmp_path / "g.csv"
    assert _check(run, "--write-baseline", base).exit_code == 0
    assert ",5,mean,20.0000" in base.read_text()
    assert _check(run, "--baseline", base, "-t", 0).exit_code == 0


def test_a_compare_csv_table_can_be_checked(tmp_path, baseline):
    run = _run(tmp_path, {**TENT, "fog": 14.0})
    table = tmp_path / "table.csv"
    res = CliRunner().invoke(_app(), ["compare", str(run), "--format", "csv", "--output", str(table)])
    assert res.exit_code == 0, res.output
    res = _check(table, "--baseline", baseline)
    assert res.exit_code == 1 and "fog" in res.stdout
    # and a table can serve as the baseline
    assert _check(_run(tmp_path, {**TENT, "fog": 14.0}, "again"), "--baseline", table, "-t", 0).exit_code == 0


def test_user_errors_exit_2_with_a_message(tmp_path, baseline):
    run = _run(tmp_path, TENT)
    res = _check(run, "--baseline", tmp_path / "absent.csv")
    assert res.exit_code == 2 and "does not exist" in res.stderr and "--write-baseline" in res.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("name,value\nfog,1\n")
    res = _check(run, "--baseline", bad)
    assert res.exit_code == 2 and "'domain' and 'error'" in res.stderr
    other = write_run(tmp_path / "o", "other-c", "tent", 0, TENT)
    res = _check(other, "--baseline", baseline)
    assert res.exit_code == 2 and "for suite 'toy-c'" in res.stderr
    res = _check(run)
    assert res.exit_code == 2 and "exactly one of --baseline" in res.stderr
    running = write_run(tmp_path / "r", "toy-c", "tent", 0, TENT, status="running")
    res = _check(running, "--baseline", baseline)
    assert res.exit_code == 2 and "--include-incomplete" in res.stderr
    assert _check(running, "--baseline", baseline, "--include-incomplete").exit_code == 0


def test_markdown_report_for_ci_summaries(tmp_path, baseline):
    report = tmp_path / "summary.md"
    res = _check(_run(tmp_path, {**TENT, "fog": 20.0}), "--baseline", baseline, "--report", report)
    assert res.exit_code == 1
    text = report.read_text()
    assert text.startswith("**FAIL") and "| fog | 12.00 | 20.00 | +8.00 | WORSE |" in text.replace("| 1 | 5 ", "")
