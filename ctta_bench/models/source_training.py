"""Train the built-in source models on the digits suite's clean split, once, and cache them.

The cache key is a hash of everything that determines the weights (architecture, its kwargs,
the training recipe, the training data's content), so a change in any of them retrains, and a
second run reuses the file. The cache lives in the user cache dir (``$CTTA_CACHE`` overrides).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CTTAError
from .builtin import BUILTIN

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
#: training recipe per built-in architecture (part of the cache key)
RECIPES = {
    "small_cnn": {"epochs": 12, "batch_size": 64, "lr": 2e-3, "weight_decay": 5e-4, "seed": 0},
    "tiny_vit": {"epochs": 40, "batch_size": 64, "lr": 2e-3, "weight_decay": 5e-2, "seed": 0,
                 "arch": {"patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4}},
}


def cache_dir() -> Path:
    env = os.environ.get("CTTA_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ctta-bench"))


def _key(name: str, num_classes: int, img_size: int, recipe: dict, data_fp: str) -> str:
    blob = json.dumps({"name": name, "classes": num_classes, "img": img_size, "recipe": recipe,
                       "data": data_fp, "torch": torch.__version__.split("+")[0].rsplit(".", 1)[0],
                       "v": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _build(name: str, num_classes: int, img_size: int, recipe: dict):
    kwargs = dict(recipe.get("arch", {}))
    if name == "tiny_vit":
        kwargs["img_size"] = img_size
    return BUILTIN[name](num_classes=num_classes, **kwargs)


def train_source(model, x, y, recipe: dict) -> None:
    """Plain supervised training (AdamW, cosine schedule, light shift/flip-free augmentation)."""
    g = torch.Generator().manual_seed(recipe["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps = recipe["epochs"] * ((len(y) + recipe["batch_size"] - 1) // recipe["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(recipe["epochs"]):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), recipe["batch_size"]):
            idx = perm[i : i + recipe["batch_size"]]
            xb = x[idx]
            # random translation by up to 2 px (digits are not flip-invariant)
            dx, dy = (torch.randint(-2, 3, (2,), generator=g)).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model((xb - 0.5) / 0.5), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def builtin_source_model(spec, num_classes: int, dataset):
    """(model, mean, std) for ``model.source: builtin``: trained on first use, then cached."""
    if spec.name not in BUILTIN:
        raise CTTAError(f"unknown builtin model '{spec.name}'; available: {', '.join(BUILTIN)}")
    if spec.checkpoint:
        raise CTTAError("model.checkpoint is for model.source: checkpoint (builtin models are trained by ctta-bench)")
    if dataset is None or not hasattr(dataset, "source_train"):
        raise CTTAError(
            f"builtin model '{spec.name}' is trained on the digits suite's source split; for "
            "other datasets use model.source: checkpoint with model.checkpoint: PATH"
        )
    from ..data.digits import data_fingerprint

    recipe = {**RECIPES[spec.name], **(spec.kwargs or {})}
    img_size = dataset.size
    key = _key(spec.name, num_classes, img_size, recipe, data_fingerprint(img_size))
    path = cache_dir() / f"{spec.name}-{key}.pt"
    model = _build(spec.name, num_classes, img_size, recipe)
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            model.eval()
            return model, MEAN, STD
        except Exception:
            pass  # unreadable cache entry: retrain and overwrite it
    x, y = dataset.source_train()
    with torch.random.fork_rng():
        torch.manual_seed(recipe["seed"])
        model = _build(spec.name, num_classes, img_size, recipe)
        train_source(model, x, y, recipe)
    from ..results import atomic_torch_save

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(path, model.state_dict())
    except (OSError, CTTAError):
        pass  # an unwritable cache costs a retraining next time, never the run
    return model, MEAN, STD
