"""Runs that survive: resume after SIGKILL/SIGTERM gives results identical to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from _cli import run_cli

COMPARE = ["index", "round", "domain", "severity", "n", "errors", "error"]
ARGS = ["--method", "tent", "--seed", "5", "-q", "--set", "batch_size=8", "--set", "n_per_domain=160",
        "--set", "shuffle=true", "--set", "domains=[gaussian_noise,fog,contrast,pixelate]",
        "--set", "checkpoint_every=3", "--set", "tent.lr=3e-3"]


def _only_run(root: Path) -> Path:
    runs = [p for p in (root / "digits-c" / "tent").iterdir()]
    assert len(runs) == 1
    return runs[0]


def _spawn(out: Path, *extra: str) -> subprocess.Popen:
    code = "from ctta_bench.cli import main; main()"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code, "run", "--out", str(out), *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _wait_for_mid_run_state(run_root: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """Wait until a state checkpoint exists past the first segment (but before the end)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        runs = list((run_root / "digits-c" / "tent").glob("*/state/latest.pt")) if (run_root / "digits-c").exists() else []
        if runs:
            try:
                st = torch.load(runs[0], map_location="cpu", weights_only=False)
                if st["segment"] >= 1 and st["batch"] >= 1:
                    return runs[0].parent.parent
            except Exception:
                pass
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("no mid-run checkpoint appeared")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    p = _spawn(out)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return pd.read_csv(_only_run(out) / "domains.csv")


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, capsys, reference):
    p = _spawn(tmp_path)
    run_dir = _wait_for_mid_run_state(tmp_path, p)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["status"] == "running"  # killed hard: nothing could mark it
    pd.read_csv(run_dir / "domains.csv")  # whatever was written is a complete table
    r = run_cli(capsys, "run", "--resume", str(run_dir), "-q")
    assert r.code == 0, r.err
    got = pd.read_csv(run_dir / "domains.csv")
    pd.testing.assert_frame_equal(got[COMPARE], reference[COMPARE])
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["status"] == "complete" and man["resumed"]


def test_sigterm_marks_interrupted_saves_state_and_resumes_identically(tmp_path, capsys, reference):
    p = _spawn(tmp_path)
    run_dir = _wait_for_mid_run_state(tmp_path, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert "resume with: ctta-bench run --resume" in out + err
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["status"] == "interrupted"
    assert not list(run_dir.rglob(".*.tmp"))
    r = run_cli(capsys, "run", "--resume", str(run_dir), "-q")
    assert r.code == 0, r.err
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "domains.csv")[COMPARE], reference[COMPARE])


def test_resume_refuses_a_changed_config_unless_forced(tmp_path, capsys):
    assert run_cli(capsys, "run", "--out", str(tmp_path), *ARGS, "--set", "domains=[fog]").code == 0
    run_dir = _only_run(tmp_path)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["method"]["hyperparameters"]["lr"] = 0.5
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli(capsys, "run", "--resume", str(run_dir), "-q")
    assert r.code != 0 and "refusing to resume" in r.err and "config.yaml changed" in r.err
    r = run_cli(capsys, "run", "--resume", str(run_dir), "--force", "-q")
    assert r.code == 0, r.err


def test_resume_refuses_another_code_version_unless_forced(tmp_path, capsys, monkeypatch):
    import ctta_bench
    from ctta_bench import runner

    monkeypatch.setattr(runner, "git_sha", lambda: "a" * 40)
    assert run_cli(capsys, "run", "--out", str(tmp_path), *ARGS, "--set", "domains=[fog]").code == 0
    run_dir = _only_run(tmp_path)
    monkeypatch.setattr(runner, "git_sha", lambda: "b" * 40)
    monkeypatch.setattr(ctta_bench, "__version__", "999.0")
    r = run_cli(capsys, "run", "--resume", str(run_dir), "-q")
    assert r.code == 2 and "refusing to resume" in r.err
    assert f"code {'a' * 10} → {'b' * 10}" in r.err and "→ 999.0" in r.err and "config" not in r.err
    assert run_cli(capsys, "run", "--resume", str(run_dir), "--force", "-q").code == 0


def test_resume_of_a_folder_without_state_is_a_clear_error(tmp_path, capsys):
    r = run_cli(capsys, "run", "--resume", str(tmp_path), "-q")
    assert r.code != 0 and "not a ctta-bench run folder" in r.err
