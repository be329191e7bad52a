"""``ctta-bench run --suite cifar10-c|imagenet-c --data-root D`` end to end on test-made data in the
published layouts: the shipped suite files, the real loaders, the standard 15-domain table."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from _cli import run_cli
from ctta_bench.data.domains import CORRUPTIONS


def _run_dir(out, suite, method):
    (d,) = list((out / suite / method).iterdir())
    return d


def _standard_table(run_dir, n):
    df = pd.read_csv(run_dir / "domains.csv")
    assert list(df.domain) == CORRUPTIONS and (df.severity == 5).all() and (df.n == n).all()
    assert df.error.between(0, 100).all()
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["status"] == "complete"
    return df, man


@pytest.fixture(scope="module")
def cifar10c_root(tmp_path_factory):
    """<root>/CIFAR-10-C/<corruption>.npy (5·8 rows) + labels.npy, as the Zenodo archive extracts."""
    root = tmp_path_factory.mktemp("data")
    d = root / "CIFAR-10-C"
    d.mkdir()
    rng = np.random.default_rng(0)
    np.save(d / "labels.npy", np.tile(rng.integers(0, 10, 8), 5).astype(np.uint8))
    for c in CORRUPTIONS:
        np.save(d / f"{c}.npy", rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    return root


def test_cifar10c_suite_through_robustbench_standard(cifar10c_root, tmp_path, capsys, monkeypatch):
    """The shipped suite with RobustBench `Standard` WRN-28-10 from $CTTA_MODELS (3 domains: the
    runner saves the 146 MB model state at every domain boundary; the 15-domain table is pinned by
    the checkpoint-model test below)."""
    from ctta_bench import _compat

    _compat.ensure_torchvision_importable()
    _compat.alias_autoattack()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from robustbench.model_zoo.architectures.wide_resnet import WideResNet
    models = tmp_path / "models"
    (models / "cifar10" / "corruptions").mkdir(parents=True)
    torch.save(WideResNet(depth=28, widen_factor=10).state_dict(), models / "cifar10" / "corruptions" / "Standard.pt")
    monkeypatch.setenv("CTTA_MODELS", str(models))
    r = run_cli(capsys, "run", "--suite", "cifar10-c", "--data-root", str(cifar10c_root), "--method", "source",
                "--out", str(tmp_path / "res"), "--set", "n_per_domain=2", "--set", "batch_size=2",
                "--set", "domains=[gaussian_noise,fog,jpeg_compression]", "-q")
    assert r.code == 0, r.err
    d = _run_dir(tmp_path / "res", "cifar10-c", "source")
    df = pd.read_csv(d / "domains.csv")
    assert list(df.domain) == ["gaussian_noise", "fog", "jpeg_compression"] and (df.n == 2).all()
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "complete"
    assert man["model"].startswith("robustbench:Standard (cifar10, corruptions)")


def test_cifar10c_suite_with_tent_on_a_checkpoint_model(cifar10c_root, tmp_path, capsys):
    from ctta_bench.models.builtin import SmallCNN

    torch.save(SmallCNN(num_classes=10).state_dict(), tmp_path / "cnn.pt")
    r = run_cli(capsys, "run", "--suite", "cifar10-c", "--data-root", str(cifar10c_root), "--method", "tent",
                "--out", str(tmp_path / "res"), "--set", "model.source=checkpoint", "--set", "model.name=small_cnn",
                "--set", f"model.checkpoint={tmp_path / 'cnn.pt'}", "--set", "batch_size=4", "--set", "shuffle=true", "-q")
    assert r.code == 0, r.err
    d = _run_dir(tmp_path / "res", "cifar10-c", "tent")
    df, _ = _standard_table(d, 8)                                  # n_per_domain 10000 → the 8 available
    assert "mean error" in r.out
    idx = np.load(d / "indices.npz")
    assert sorted(idx["seg0000"].tolist()) == list(range(8))


def _imagenet_c(root, wnids, per_class=2, size=40, empty_classes=()):
    """<root>/<corruption>/5/<wnid>/ILSVRC2012_val_*.JPEG, as the Zenodo archives extract."""
    rng = np.random.default_rng(0)
    for c in CORRUPTIONS:
        for w in empty_classes:
            (root / c / "5" / w).mkdir(parents=True)
        for w in wnids:
            (root / c / "5" / w).mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    root / c / "5" / w / f"ILSVRC2012_val_{k:08d}.JPEG")


def test_imagenet_c_suite_through_robustbench_standard_r50(tmp_path, capsys, monkeypatch):
    """The shipped suite as is (RobustBench Standard_R50 = torchvision's ResNet-50, 1000 classes),
    weights from a test-made file in torch hub's cache; images at 64 px to keep the test fast."""
    import torchvision

    # all 1000 class folders (the label is the sorted folder position), images in two of them
    _imagenet_c(tmp_path / "ImageNet-C", ["n00000000", "n00000001"], per_class=1, size=72,
                empty_classes=[f"n{i:08d}" for i in range(2, 1000)])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), ckpt)
    r = run_cli(capsys, "run", "--suite", "imagenet-c", "--data-root", str(tmp_path), "--method", "source",
                "--out", str(tmp_path / "res"), "--set", "dataset.subset=all", "--set", "dataset.num_workers=0",
                "--set", "preprocess.resize=72", "--set", "preprocess.crop=64", "--set", "batch_size=2", "-q")
    assert r.code == 0, r.err
    _, man = _standard_table(_run_dir(tmp_path / "res", "imagenet-c", "source"), 2)
    assert "Standard_R50" in man["model"] and man["params"]["total"] == 25_557_032  # ResNet-50


def test_imagenet_c_suite_on_a_test_made_folder(tmp_path, capsys):
    _imagenet_c(tmp_path / "ImageNet-C", ["n01440764", "n01443537", "n01484850"])
    from ctta_bench.models.builtin import SmallCNN

    torch.save(SmallCNN(num_classes=3).state_dict(), tmp_path / "cnn.pt")
    r = run_cli(capsys, "run", "--suite", "imagenet-c", "--data-root", str(tmp_path), "--method", "tent",
                "--out", str(tmp_path / "res"), "--set", "dataset.classes=3", "--set", "dataset.subset=all",
                "--set", "dataset.num_workers=0", "--set", "preprocess.resize=36", "--set", "preprocess.crop=32",
                "--set", "model.source=checkpoint", "--set", "model.name=small_cnn",
                "--set", f"model.checkpoint={tmp_path / 'cnn.pt'}", "--set", "batch_size=3", "-q")
    assert r.code == 0, r.err
    _standard_table(_run_dir(tmp_path / "res", "imagenet-c", "tent"), 6)


def test_missing_data_fails_before_the_model_with_path_and_source(tmp_path, capsys):
    r = run_cli(capsys, "run", "--suite", "cifar10-c", "--data-root", str(tmp_path / "nothing"),
                "--out", str(tmp_path / "res"), "-q")
    assert r.code == 2 and "Traceback" not in r.err
    assert str(tmp_path / "nothing") in r.err and "zenodo.org/record/2535967" in r.err
    r = run_cli(capsys, "run", "--suite", "imagenet-c", "--data-root", str(tmp_path), "--out", str(tmp_path / "res"), "-q")
    assert r.code == 2 and "zenodo.org/record/2235448" in r.err and "gaussian_noise" in r.err
