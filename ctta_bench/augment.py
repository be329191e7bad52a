"""CoTTA's test-time augmentations, applied to many views of a batch at once.

The official pipeline (``qinenergy/cotta``, ``get_tta_transforms`` + ``my_transforms.py``) is, per
call on a whole batch ``x`` of [0, 1] images::

    Clip(0, 1) → ColorJitterPro(brightness, contrast, saturation, hue, gamma; random order)
    → Pad(size//2, 'edge') → RandomAffine(degrees, translate, scale; bilinear)
    → GaussianBlur(5, sigma) → CenterCrop(size) → RandomHorizontalFlip(0.5)
    → + N(0, noise_std) per pixel → Clip(0, 1)

Every call draws **one** parameter set for the whole batch (the noise is per pixel). CoTTA makes
32 such calls, one per view. Here :meth:`CoTTAAugmentation.sample` draws the parameters of all
views at once and :meth:`CoTTAAugmentation.apply` produces any contiguous range of views as one
``(views·N, C, H, W)`` tensor:

* colour ops run on all views of a range together (views grouped by which op comes next);
* pad → warp → blur → crop is computed only on the output window plus the blur margin: sampling
  the original image with ``padding_mode='border'`` equals sampling the edge-padded canvas, and the
  official ranges never sample outside that canvas, so the result is the official one;
* the horizontal flip is folded into the warp grid (the Gaussian kernel is symmetric, so
  flip∘blur = blur∘flip);
* noise is drawn view by view on the input's device with the global generator of that device, so
  any split of the views into ranges gives the same images under the same seed.

:func:`separate_batch_statistics` lets a network in batch-statistics BatchNorm mode process
``G`` views concatenated along the batch dimension as if each view were its own batch.
"""
from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .errors import CTTAError
from .typed import require

Range = tuple[float, float]

#: ColorJitterPro's five ops, in the index order of ``ViewParams.factors``/``order``
JITTER_OPS = ("brightness", "contrast", "saturation", "hue", "gamma")


@dataclass
class AugmentConfig:
    """Ranges of CoTTA's augmentations; defaults = official ``get_tta_transforms()`` (soft=False).

    ``translate`` is the fraction of the *padded* canvas (official ``translate=(1/16, 1/16)`` after
    ``Pad(size//2)``), so the largest shift is ``translate·2·size`` pixels, rounded to an integer.
    """

    brightness: Range = (0.6, 1.4)
    contrast: Range = (0.7, 1.3)
    saturation: Range = (0.5, 1.5)
    hue: Range = (-0.06, 0.06)
    gamma: Range = (0.7, 1.3)
    degrees: Range = (-15.0, 15.0)
    translate: float = 1.0 / 16.0
    scale: Range = (0.9, 1.1)
    blur_kernel: int = 5
    blur_sigma: Range = (0.001, 0.5)
    hflip_p: float = 0.5
    noise_std: float = 0.005

    def validate(self) -> None:
        for name in ("brightness", "contrast", "saturation", "hue", "gamma", "degrees", "scale", "blur_sigma"):
            lo_hi = getattr(self, name)
            require(len(lo_hi) == 2 and lo_hi[0] <= lo_hi[1],
                    f"augment.{name} must be a [low, high] pair with low <= high, got {lo_hi!r}")
        for name in ("brightness", "contrast", "saturation"):
            require(getattr(self, name)[0] >= 0, f"augment.{name} factors must be >= 0, got {getattr(self, name)}")
        require(-0.5 <= self.hue[0] and self.hue[1] <= 0.5, f"augment.hue must lie in [-0.5, 0.5], got {self.hue}")
        require(self.gamma[0] > 0, f"augment.gamma must be > 0, got {self.gamma}")
        require(self.scale[0] > 0, f"augment.scale must be > 0, got {self.scale}")
        require(self.blur_sigma[0] > 0, f"augment.blur_sigma must be > 0, got {self.blur_sigma}")
        require(self.blur_kernel >= 1 and self.blur_kernel % 2 == 1,
                f"augment.blur_kernel must be a positive odd integer, got {self.blur_kernel}")
        require(0 <= self.translate <= 0.25, f"augment.translate must be in [0, 0.25], got {self.translate}")
        require(0 <= self.hflip_p <= 1, f"augment.hflip_p must be in [0, 1], got {self.hflip_p}")
        require(self.noise_std >= 0, f"augment.noise_std must be >= 0, got {self.noise_std}")


#: official CIFAR code: ``cifar/cotta.py`` calls ``get_tta_transforms()`` with its defaults
#: (soft=False, gaussian_std=0.005); the official ImageNet code does the same (only the image size,
#: taken here from the batch, differs). ``soft`` is the ``soft=True`` variant of the same function.
AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "cifar": AugmentConfig(),
    "imagenet": AugmentConfig(),
    "soft": AugmentConfig(
        brightness=(0.8, 1.2), contrast=(0.85, 1.15), saturation=(0.75, 1.25), hue=(-0.03, 0.03),
        gamma=(0.85, 1.15), degrees=(-8.0, 8.0), scale=(0.95, 1.05), blur_sigma=(0.001, 0.25),
    ),
}


def augment_preset(name: str) -> AugmentConfig:
    """A copy of the named preset (``cifar`` | ``imagenet`` | ``soft``)."""
    if name not in AUGMENT_PRESETS:
        raise CTTAError(f"unknown augment preset '{name}': use one of {', '.join(AUGMENT_PRESETS)}")
    return replace(AUGMENT_PRESETS[name])


@dataclass
class ViewParams:
    """One parameter set per view (CPU tensors; the op order and flips steer host-side grouping)."""

    factors: Tensor    # (V, 5) float64: brightness, contrast, saturation, hue, gamma factors
    order: Tensor      # (V, 5) int64: permutation of the five colour ops (ColorJitterPro randperm)
    angle: Tensor      # (V,) degrees
    shift: Tensor      # (V, 2) integer pixel translation (tx, ty) on the padded canvas
    scale: Tensor      # (V,)
    sigma: Tensor      # (V,) blur sigma
    flip: Tensor       # (V,) bool
    #: ``order`` as Python lists, read from the CPU tensor once per draw (host-side grouping)
    order_rows: list = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.order_rows = self.order.tolist()

    def __len__(self) -> int:
        return int(self.factors.shape[0])


class CoTTAAugmentation:
    """CoTTA's augmentation pipeline for many views at once (see the module docstring)."""

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg if cfg is not None else AugmentConfig()
        self.cfg.validate()

    # -- parameters ------------------------------------------------------------------------------
    def sample(self, n_views: int, height: int, width: int,
               generator: Optional[torch.Generator] = None) -> ViewParams:
        """Draw the parameters of ``n_views`` views from the CPU generator (as the official code).

        Ranges as official ``RandomAffine.get_params``/``GaussianBlur.get_params``/
        ``ColorJitterPro``; the translation bound is ``translate`` × the padded canvas size.
        """
        c = self.cfg
        u = torch.rand(n_views, 16, generator=generator, dtype=torch.float64)

        def between(col: int, lo_hi: Range) -> Tensor:
            return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * u[:, col]

        factors = torch.stack([between(i, getattr(c, op)) for i, op in enumerate(JITTER_OPS)], 1)
        pad = height // 2
        max_dx, max_dy = c.translate * (width + 2 * pad), c.translate * (height + 2 * pad)
        shift = torch.stack([torch.round(between(11, (-max_dx, max_dx))),
                             torch.round(between(12, (-max_dy, max_dy)))], 1)
        return ViewParams(
            factors=factors,
            order=u[:, 5:10].argsort(1),
            angle=between(10, c.degrees),
            shift=shift,
            scale=between(13, c.scale),
            sigma=between(14, c.blur_sigma),
            flip=u[:, 15] < c.hflip_p,
        )

    # -- images ----------------------------------------------------------------------------------
    def apply(self, x: Tensor, params: ViewParams, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """Views ``start:stop`` of batch ``x`` (N, 3, H, W) as one ((stop−start)·N, 3, H, W) tensor."""
        stop = len(params) if stop is None else stop
        if x.dim() != 4 or x.shape[1] != 3:
            raise CTTAError(f"CoTTA augmentations need RGB batches (N, 3, H, W), got shape {tuple(x.shape)}")
        k = stop - start
        n, _, h, w = x.shape
        dev, dt = x.device, x.dtype
        sel = slice(start, stop)
        # all per-view parameters of this range reach the device in two copies, before any op
        plan, index = _jitter_plan(params.order_rows[sel])
        num = torch.cat([params.factors[sel], params.angle[sel, None], params.shift[sel],
                         params.scale[sel, None], params.sigma[sel, None], params.flip[sel, None].double()], 1)
        num, index = _to_device(num.to(dt), dev), _to_device(index, dev)
        factors, angle, shift, scale, sigma, flip = num[:, :5], num[:, 5], num[:, 6:8], num[:, 8], num[:, 9], num[:, 10]

        views = x.clamp(0.0, 1.0).unsqueeze(0).expand(k, n, 3, h, w)
        views = _color_jitter(views, factors, plan, index)
        views = self._warp_blur(views, angle, shift, scale, sigma, flip)
        if self.cfg.noise_std > 0:
            noise = torch.empty_like(views)
            for i in range(k):  # one draw per view, in view order: chunking does not change the noise
                noise[i].normal_()
            views.add_(noise, alpha=self.cfg.noise_std)
        return views.clamp_(0.0, 1.0).reshape(k * n, 3, h, w)

    def __call__(self, x: Tensor, n_views: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n_views`` augmented copies of ``x``, view-major: (n_views·N, 3, H, W)."""
        return self.apply(x, self.sample(n_views, x.shape[-2], x.shape[-1], generator))

    def _warp_blur(self, views: Tensor, angle: Tensor, shift: Tensor, scale: Tensor, sigma: Tensor,
                   flip: Tensor) -> Tensor:
        """Edge-pad → affine (bilinear) → Gaussian blur → centre crop → optional h-flip, per view.

        The inverse map is torchvision's ``_get_inverse_affine_matrix`` with zero shear, centre at
        the image centre: ``p_in = R(θ)ᵀ (p_out − t) / s`` in centred pixel coordinates.
        """
        k, n, ch, h, w = views.shape
        m = self.cfg.blur_kernel // 2
        hw_, ww_ = h + 2 * m, w + 2 * m  # output window: the crop plus the blur margin
        dev, dt = views.device, views.dtype
        xs = torch.arange(ww_, device=dev, dtype=dt) - (ww_ - 1) / 2.0
        ys = torch.arange(hw_, device=dev, dtype=dt) - (hw_ - 1) / 2.0
        sign = 1.0 - 2.0 * flip  # flipped views (flip = 1.0) mirror x (flip commutes with the symmetric blur)
        xo = (sign[:, None] * xs[None, :])[:, None, :] - shift[:, 0, None, None]   # (k, 1, Ww)
        yo = ys[None, :, None] - shift[:, 1, None, None]                          # (k, Hw, 1)
        rad = angle * (math.pi / 180.0)
        cos, sin = (torch.cos(rad) / scale)[:, None, None], (torch.sin(rad) / scale)[:, None, None]
        gx = (cos * xo + sin * yo) * (2.0 / w)     # normalised for grid_sample, align_corners=False
        gy = (cos * yo - sin * xo) * (2.0 / h)
        grid = torch.stack([gx, gy], -1)           # (k, Hw, Ww, 2)
        warped = F.grid_sample(views.reshape(k, n * ch, h, w), grid, mode="bilinear",
                               padding_mode="border", align_corners=False)
        if m == 0:
            return warped.reshape(k, n, ch, h, w)
        # separable Gaussian (torchvision _get_gaussian_kernel1d), one kernel per view, valid taps
        taps = torch.arange(2 * m + 1, device=dev, dtype=dt) - m
        kern = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
        kern = (kern / kern.sum(1, keepdim=True))[:, :, None, None]  # (k, K, 1, 1)
        rows = warped[:, :, 0:h, :] * kern[:, 0, None]
        for i in range(1, 2 * m + 1):
            rows.addcmul_(warped[:, :, i:i + h, :], kern[:, i, None])
        out = rows[..., 0:w] * kern[:, 0, None]
        for i in range(1, 2 * m + 1):
            out.addcmul_(rows[..., i:i + w], kern[:, i, None])
        return out.reshape(k, n, ch, h, w)


# -- colour ops (torchvision.transforms.functional semantics on float images) --------------------
def _gray(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma as torchvision ``rgb_to_grayscale``; keeps the channel dim (size 1)."""
    r, g, b = x.unbind(-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _blend(img: Tensor, other: Tensor, f: Tensor) -> Tensor:
    """torchvision ``_blend``: (f·img + (1−f)·other) clipped to [0, 1]."""
    return (f * img).add_((1.0 - f) * other).clamp_(0.0, 1.0)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (f * x).clamp_(0.0, 1.0)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x), f)


def _hue(x: Tensor, f: Tensor) -> Tensor:
    """torchvision ``adjust_hue``: RGB→HSV, h ← (h + f) mod 1, HSV→RGB."""
    r, g, b = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]
    v = x.amax(-3, keepdim=True)
    chroma = v - x.amin(-3, keepdim=True)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    h = torch.where(v == r, (g - b) / safe,
                    torch.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = torch.where(chroma > 0, h, torch.zeros_like(h))
    h6 = torch.remainder(h + 6.0 * f, 6.0)  # 6·((h/6 + f) mod 1)
    out = []
    for shift in (5.0, 3.0, 1.0):  # channel = v − chroma·clamp(min(k, 4−k), 0, 1), k = (shift + 6h) mod 6
        kk = torch.remainder(h6 + shift, 6.0)
        out.append(v - chroma * torch.minimum(kk, 4.0 - kk).clamp_(0.0, 1.0))
    return torch.cat(out, -3)


def _gamma(x: Tensor, f: Tensor) -> Tensor:
    """ColorJitterPro clamps to [1e-8, 1] first (official NaN fix), then ``adjust_gamma`` (gain 1)."""
    return x.clamp(1e-8, 1.0).pow(f).clamp_(0.0, 1.0)


_OPS = (_brightness, _contrast, _saturation, _hue, _gamma)


def _jitter_plan(rows: list[list[int]]) -> tuple[list[list[tuple[int, int, int]]], Tensor]:
    """For each of the five positions, which views apply which op there.

    ``plan[slot]`` lists ``(op, offset, length)``: the views are ``index[offset:offset+length]``
    (offset −1: all views of the range apply that op). Built on the host from ``order_rows``
    (plain Python: no tensor is read back).
    """
    plan, pieces, offset = [], [], 0
    for slot in range(len(rows[0]) if rows else 0):
        ops = [r[slot] for r in rows]
        present = sorted(set(ops))
        if len(present) == 1:
            plan.append([(present[0], -1, len(ops))])
            continue
        groups = []
        for j in present:
            idx = [v for v, o in enumerate(ops) if o == j]
            groups.append((j, offset, len(idx)))
            pieces.extend(idx)
            offset += len(idx)
        plan.append(groups)
    index = torch.tensor(pieces, dtype=torch.long)
    return plan, index


def _color_jitter(views: Tensor, factors: Tensor, plan: list, index: Tensor) -> Tensor:
    """ColorJitterPro with per-view factors and op order; views (k, N, 3, H, W).

    At each of the five positions the views are grouped by the op they apply there, so every
    view gets exactly its five ops, in its order, with no wasted work.
    """
    k = views.shape[0]
    f = factors.reshape(k, 5, 1, 1, 1, 1)
    for groups in plan:
        if groups[0][1] < 0:
            j = groups[0][0]
            views = _OPS[j](views, f[:, j])
            continue
        out = torch.empty(views.shape, device=views.device, dtype=views.dtype)
        for j, offset, length in groups:
            idx = index.narrow(0, offset, length)
            out.index_copy_(0, idx, _OPS[j](views.index_select(0, idx), f.index_select(0, idx)[:, j]))
        views = out
    return views


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor → ``device`` without a stream sync on CUDA (pinned, non-blocking copy)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# -- BatchNorm with per-view statistics ---------------------------------------------------------
def _grouped_batch_norm(bn: nn.modules.batchnorm._BatchNorm, group: int, x: Tensor) -> Tensor:
    """Batch-statistics BN where each consecutive block of ``group`` samples is its own batch."""
    g = x.shape[0] // group
    if g * group != x.shape[0]:
        raise RuntimeError(f"batch of {x.shape[0]} is not a whole number of views of {group}")
    xg = x.unflatten(0, (g, group))                            # (G, n, C, *spatial): a view
    dims = (1,) + tuple(range(3, xg.dim()))
    var, mean = torch.var_mean(xg, dim=dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        shape = (1, 1, -1) + (1,) * (xg.dim() - 3)
        scale = scale * bn.weight.reshape(shape)
        shift = bn.bias.reshape(shape) - mean * scale
    else:
        shift = -mean * scale
    return torch.addcmul(shift, xg, scale).flatten(0, 1)


def _per_view_forward(group: int):
    def forward(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
        if x.shape[0] == group:  # a single view: the layer's own forward, exactly as official
            return type(bn).forward(bn, x)
        return _grouped_batch_norm(bn, group, x)

    return forward


def _uses_batch_statistics(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training or (bn.running_mean is None and bn.running_var is None)


@contextlib.contextmanager
def separate_batch_statistics(model: nn.Module, group: int) -> Iterator[nn.Module]:
    """Inside the block, BatchNorm layers that normalise with batch statistics treat each
    consecutive block of ``group`` samples as a separate batch (its own mean/variance).

    This makes one forward over V views concatenated along the batch dimension equal to V
    forwards of one view each, as the official CoTTA code runs them. Layers in eval mode with
    running statistics are per-sample already and are left alone; layers that would *update*
    running statistics are refused (the per-view updates would not be defined).
    """
    patched = []
    try:
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not _uses_batch_statistics(m):
                continue
            if m.training and m.track_running_stats and m.running_mean is not None:
                raise CTTAError(
                    f"{type(m).__name__} updates running statistics; per-view batching needs batch "
                    "statistics without running stats (track_running_stats=False, as CoTTA configures)"
                )
            patched.append((m, m.__dict__.get("forward")))
            m.forward = types.MethodType(_per_view_forward(group), m)
        yield model
    finally:
        for m, previous in patched:
            if previous is None:
                del m.forward
            else:
                m.forward = previous
