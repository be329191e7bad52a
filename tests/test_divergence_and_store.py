"""Divergence handling (NaN/Inf) and the atomic results store (disk full never loses old files)."""
from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from ctta_bench import CTTAError, Method, register
from ctta_bench.errors import DivergedError
from ctta_bench.registry import methods
from ctta_bench.results import atomic_write_text, write_csv
from ctta_bench.runner import RunOptions, run


@dataclass
class NanAfterConfig:
    after: int = 3   # batches before the logits turn NaN


class NanAfter(Method):
    """Test plugin: behaves as source, then emits NaN logits from batch ``after`` on."""

    name = "test-nan-after"
    summary = "test only"
    Config = NanAfterConfig

    def __init__(self, model, cfg=None):
        super().__init__(model, cfg)
        self.model.eval()
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def forward(self, x):
        logits = self.model(x)
        self.seen += 1
        if int(self.seen) > self.cfg.after:
            logits = logits * float("nan")
        self.mark_finite(logits)
        return logits


methods()
if "test-nan-after" not in methods():
    register(NanAfter)

OVR = ["batch_size=32", "n_per_domain=96", "domains=[fog,contrast,pixelate]"]


def test_divergence_stops_the_run_keeps_rows_and_reports_where(tmp_path):
    with pytest.raises(DivergedError, match=r"non-finite loss/logits in contrast \(severity 3, round 1\) at batch 1;"):
        run(RunOptions(method="test-nan-after", out=tmp_path, overrides=OVR + ["test-nan-after.after=4"]))
    (d,) = list((tmp_path / "digits-c" / "test-nan-after").iterdir())
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "diverged" and "contrast" in man["error"]
    rows = pd.read_csv(d / "domains.csv")
    assert list(rows.domain) == ["fog"]  # the finished domain is kept


def test_divergence_reset_option_resets_and_counts(tmp_path):
    res = run(RunOptions(method="test-nan-after", out=tmp_path,
                         overrides=OVR + ["test-nan-after.after=4", "on_divergence=reset"]))
    assert res.status == "complete"
    assert res.summary["divergence_resets"] >= 1
    assert len(res.rows) == 3


def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "domains.csv"
    write_csv(target, [{"a": 1}], ["a"])
    before = target.read_text()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CTTAError, match="the disk is full; files written before are intact"):
        write_csv(target, [{"a": 2}], ["a"])
    assert target.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["domains.csv"]  # no temp file left


def test_disk_full_during_a_run_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from _cli import run_cli
    import ctta_bench.results as results

    real = results.write_csv
    calls = {"n": 0}

    def flaky(path, rows, cols):
        calls["n"] += 1
        if path.name == "domains.csv" and len(rows) >= 2:
            raise CTTAError(f"could not write {path}: the disk is full; files written before are intact")
        return real(path, rows, cols)

    monkeypatch.setattr("ctta_bench.runner.write_csv", flaky)
    r = run_cli(capsys, "run", "--method", "source", "--out", str(tmp_path), "-q",
                *[a for o in OVR for a in ("--set", o)])
    assert r.code != 0 and "disk is full" in r.err and "Traceback" not in r.err
    (d,) = list((tmp_path / "digits-c" / "source").iterdir())
    assert list(pd.read_csv(d / "domains.csv").domain) == ["fog"]
    assert json.loads((d / "manifest.json").read_text())["status"] == "failed"


def test_atomic_text_write_replaces_content(tmp_path):
    p = tmp_path / "x.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"


def test_results_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    """Colleagues on a shared machine must be able to read a run's tables (umask applies)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        p = tmp_path / "domains.csv"
        atomic_write_text(p, "a,b\n")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    finally:
        os.umask(old)
