"""The embedded default suite: scikit-learn's handwritten digits under synthetic corruptions.

Real data that ships inside an installed wheel (1,797 8×8 images, UCI optdigits), so
``ctta-bench run`` works on a fresh machine with no download. Images are upsampled to 32×32
RGB in [0, 1] and split once, by a fixed permutation, into a clean source part (train/test)
and a target part; the target part is corrupted per domain by :mod:`ctta_bench.data.digit_corruptions`.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CTTAError
from .base import TensorDomain
from .digit_corruptions import DIGIT_CORRUPTIONS, corrupt

SPLIT_SEED = 20240526   # the fixed split of the 1,797 images (independent of the run seed)
FRACTIONS = (0.55, 0.15, 0.30)  # source train / source test / target


@lru_cache(maxsize=1)
def _digits(size: int = 32):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)   # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    n_tr = int(FRACTIONS[0] * len(y))
    n_te = int(FRACTIONS[1] * len(y))
    parts = {
        "train": perm[:n_tr], "test": perm[n_tr : n_tr + n_te], "target": perm[n_tr + n_te :],
    }
    return x, y, parts


def split(name: str, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``train`` | ``test`` | ``target``: clean images (N,3,size,size) and labels."""
    x, y, parts = _digits(size)
    idx = torch.from_numpy(parts[name])
    return x[idx], y[idx]


def data_fingerprint(size: int = 32) -> str:
    """A content hash of the source training split (part of the cached model's key)."""
    x, y = split("train", size)
    h = hashlib.sha256()
    h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]


class DigitsC:
    """Dataset kind ``digits-c``: the target split under a corruption at a severity (1..5)."""

    standard_domains = list(DIGIT_CORRUPTIONS)

    def __init__(self, spec, preprocess):
        self.spec = spec
        self.preprocess = preprocess
        self.size = preprocess.resize or 32
        if spec.classes != 10:
            raise CTTAError(f"digits-c has 10 classes, the suite says classes={spec.classes}")

    def check(self, domains, severities) -> None:
        try:
            import sklearn  # noqa: F401
        except ImportError:  # pragma: no cover - a core dependency
            raise CTTAError("digits-c needs scikit-learn: pip install scikit-learn") from None

    def domain_size(self, domain: str, severity: int) -> int:
        return len(split("target")[1])

    def labels(self, domain: str, severity: int) -> np.ndarray:
        return split("target")[1].numpy()

    @lru_cache(maxsize=4)
    def _corrupted(self, domain: str, severity: int):
        x, y = split("target", 32)
        xc = corrupt(x, domain, severity)
        if self.size != 32:
            xc = F.interpolate(xc, size=(self.size, self.size), mode=self.preprocess.interpolation,
                               align_corners=False if self.preprocess.interpolation != "nearest" else None)
        return xc, y

    def open(self, domain: str, severity: int, indices: np.ndarray) -> TensorDomain:
        x, y = self._corrupted(domain, severity)
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        return TensorDomain(x[idx], y[idx])

    def source_test(self) -> TensorDomain:
        x, y = split("test", self.size)
        return TensorDomain(x, y)

    def source_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return split("train", self.size)
