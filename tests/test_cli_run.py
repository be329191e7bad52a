"""``ctta-bench run`` end to end on the embedded digits suite, and its one-line errors."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import yaml

from _cli import run_cli

SMALL = ["--set", "n_per_domain=96", "--set", "batch_size=32",
         "--set", "domains=[gaussian_noise,defocus_blur,contrast]", "-q"]


def _run_dir(out, suite, method):
    (d,) = list((out / suite / method).iterdir())
    return d


def test_run_writes_config_manifest_and_domain_table(tmp_path, capsys):
    r = run_cli(capsys, "run", "--method", "tent", "--out", str(tmp_path), "--seed", "3",
                "--set", "tent.lr=5e-4", *SMALL)
    assert r.code == 0, r.err
    assert "mean error" in r.out and "run id" in r.out
    d = _run_dir(tmp_path, "digits-c", "tent")
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["method"] == {"name": "tent", "hyperparameters": {
        "optimizer": "adam", "lr": 5e-4, "beta1": 0.9, "momentum": 0.9, "weight_decay": 0.0, "steps": 1}}
    assert cfg["suite"]["batch_size"] == 32 and cfg["run"]["seed"] == 3
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "complete" and man["seed"] == 3 and man["versions"]["torch"]
    df = pd.read_csv(d / "domains.csv")
    assert list(df.domain) == ["gaussian_noise", "defocus_blur", "contrast"]
    assert (df.n == 96).all()
    assert df.error.between(0, 100).all() and (df.img_per_s > 0).all() and (df.peak_mem_mb > 0).all()
    assert man["summary"]["mean_error"] == pytest.approx(df.error.mean())
    b = pd.read_csv(d / "batches.csv")
    assert b.groupby("index").errors.sum().tolist() == df.errors.tolist()
    assert not list(d.glob(".*.tmp"))  # no temporary files left behind


def test_stream_is_identical_for_every_method(tmp_path, capsys):
    for m in ("source", "norm"):
        assert run_cli(capsys, "run", "--method", m, "--out", str(tmp_path), "--set", "shuffle=true", *SMALL).code == 0
    import numpy as np

    a = np.load(_run_dir(tmp_path, "digits-c", "source") / "indices.npz")
    b = np.load(_run_dir(tmp_path, "digits-c", "norm") / "indices.npz")
    assert a.files == b.files
    for k in a.files:
        assert np.array_equal(a[k], b[k])
    assert not np.array_equal(a["seg0000"], np.arange(len(a["seg0000"])))  # shuffled


def test_tent_beats_source_and_corruption_hurts_source(tmp_path, capsys):
    args = ["--out", str(tmp_path), "-q", "--set", "domains=[gaussian_noise,fog,contrast]"]
    assert run_cli(capsys, "run", "--method", "source", *args).code == 0
    assert run_cli(capsys, "run", "--method", "tent", *args).code == 0
    src = pd.read_csv(_run_dir(tmp_path, "digits-c", "source") / "domains.csv").error.mean()
    tent = pd.read_csv(_run_dir(tmp_path, "digits-c", "tent") / "domains.csv").error.mean()
    assert src > 30.0          # clean error of the source CNN is ~1 %
    assert tent < src - 15.0


def test_reset_each_shift_resets_before_every_domain(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--method", "tent", "--set", "tent.lr=1e-2", *SMALL]
    assert run_cli(capsys, "run", *args, "--set", "setting=reset_each_shift",
                   "--set", "domains=[contrast,contrast]").code == 0
    df = pd.read_csv(_run_dir(tmp_path, "digits-c", "tent") / "domains.csv")
    assert df.errors[0] == df.errors[1]   # same data, same start state → same errors


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method 'nope'; available:"),
    (["--suite", "nope"], "unknown suite 'nope'; available: "),
    (["--set", "batchsize=3"], "unknown key 'batchsize' in --set (did you mean 'batch_size'?)"),
    (["--set", "batch_size=many"], "expected an integer, got 'many'"),
    (["--set", "batch_size=0"], "batch_size must be >= 1"),
    (["--set", "tent.lr=-1"], "lr must be > 0"),
    (["--set", "tent.foo=1"], "unknown key 'foo' in tent"),
    (["--set", "setting=sideways"], "unknown setting 'sideways'"),
    (["--set", "domains=[gaussian_noise,rain]"], "unknown corruption 'rain'"),
    (["--set", "noequals"], "--set expects key=value"),
    (["--device", "cuda"], "no CUDA device is available"),
])
def test_bad_input_is_one_clear_line_and_nonzero_exit(tmp_path, capsys, args, message):
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present on this machine")
    r = run_cli(capsys, "run", "--out", str(tmp_path), "-q", *args)
    assert r.code != 0
    assert message in r.err, r.err
    assert "Traceback" not in r.err + r.out
    assert len(r.err.strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_output_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    r = run_cli(capsys, "run", "--out", str(ro), "-q", *SMALL)
    assert r.code != 0 and "not writable" in r.err


def test_permission_denied_output_directory_even_as_root(tmp_path, capsys, monkeypatch):
    """The EACCES path, as an unprivileged user meets it (root ignores chmod, so it is injected)."""
    import errno
    from pathlib import Path

    real_mkdir = Path.mkdir
    ro = tmp_path / "ro"

    def mkdir(self, *a, **k):
        if str(self).startswith(str(ro)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    r = run_cli(capsys, "run", "--out", str(ro), "-q", *SMALL)
    assert r.code == 2 and "not writable (Permission denied)" in r.err and "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) == 1


def test_output_directory_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    r = run_cli(capsys, "run", "--out", str(f), "-q", *SMALL)
    assert r.code != 0 and "not writable" in r.err and "Traceback" not in r.err


def test_listing_commands(capsys):
    r = run_cli(capsys, "methods")
    assert r.code == 0 and "tent" in r.out and "source" in r.out
    r = run_cli(capsys, "suites")
    assert r.code == 0 and "digits-c" in r.out


def test_source_forgetting_evaluation_and_rounds(tmp_path, capsys):
    r = run_cli(capsys, "run", "--method", "tent", "--out", str(tmp_path), *SMALL,
                "--set", "source_eval=true", "--set", "rounds=2")
    assert r.code == 0, r.err
    d = _run_dir(tmp_path, "digits-c", "tent")
    dom = pd.read_csv(d / "domains.csv")
    assert list(dom["round"]) == [1, 1, 1, 2, 2, 2] and list(dom["index"]) == list(range(6))
    src = pd.read_csv(d / "source_eval.csv")
    assert list(src.after_index) == list(range(6))
    from ctta_bench.data.digits import split

    assert (src.n == len(split("test")[1])).all() and src.error.between(0, 100).all()


def test_vit_only_method_on_a_cnn_suite_is_one_clear_line(tmp_path, capsys):
    r = run_cli(capsys, "run", "--method", "moase", "--out", str(tmp_path), *SMALL)
    assert r.code != 0 and "Traceback" not in r.err
    assert "needs a timm VisionTransformer" in r.err and "source, tent" in r.err.replace("cotta, norm, ", "")
    (d,) = list((tmp_path / "digits-c" / "moase").iterdir())
    import json as _json

    assert _json.loads((d / "manifest.json").read_text())["status"] == "failed"
