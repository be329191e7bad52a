"""``make-corrupted``: build a -C data set from a clean one, in the exact published layout.

The 15 corruptions × 5 severities of Hendrycks & Dietterich (ICLR 2019, github.com/hendrycks/robustness,
``ImageNet-C/create_c``), written as

* CIFAR style (``fmt="arrays"``): ``<out>/<corruption>.npy`` uint8 (5·N, H, W, 3), severities 1..5
  stacked, and ``<out>/labels.npy`` (5·N,) (the N labels tiled, uint8 as in the release) — what
  :class:`ctta_bench.data.cifar_c.CifarC` and RobustBench's ``load_cifar10c`` read;
* ImageNet style (``fmt="folder"``): ``<out>/<corruption>/<severity>/<class>/<stem>.JPEG`` (JPEG
  quality 85, ``optimize``, as ``make_imagenet_c.py`` saves) — what
  :class:`ctta_bench.data.imagenet_c.ImageNetC` reads.

Corruption code: the **imagecorruptions-imaug** fork (import name ``imagecorruptions``) of
Michaelis et al.'s ``imagecorruptions`` package, which packages Hendrycks' ImageNet-C functions.
The original ``imagecorruptions`` 1.1.2 is broken on current numpy/scikit-image (e.g. ``fog``'s
plasma fractal uses the removed ``np.float_``, ``glass_blur`` passes scikit-image's removed
``multichannel=``, and it imports ``pkg_resources``); the fork runs all 15 with numpy/OpenCV/numba,
needs no ImageMagick and ships the frost textures.

Parameter tables (``params=``):

* ``"imagenet"`` — imagecorruptions' functions unchanged (ImageNet-C parameters; images ≥ 32 px).
  They follow ``make_imagenet_c.py`` with the package's own approximations (numpy motion blur for
  ImageMagick's, frost textures rescaled to the image, elastic without the affine step), so the
  output is ImageNet-C-like, never byte-identical to the release (neither is the ``cifar`` table:
  the per-image random draws differ).
* ``"cifar"`` — the milder per-severity parameters of Hendrycks' ``make_cifar_c.py`` (the
  CIFAR-10-C/CIFAR-100-C release), :data:`CIFAR_PARAMS`. imagecorruptions' functions hard-code the
  ImageNet values, so these are re-implemented here on the fork's helpers (``disk`` kernel,
  ``plasma_fractal``, numpy ``_motion_blur``). Same formulas as ``make_cifar_c.py`` for
  gaussian/shot/impulse noise, defocus blur, zoom blur, contrast, brightness, JPEG, pixelate (box
  down, box up), fog, frost, glass blur and elastic (affine + elastic) — with sizes taken from the
  image instead of the hard-coded 32 — except: **motion_blur** and **snow** use the fork's numpy
  motion blur instead of ImageMagick's ``MotionBlurImage`` (as the fork does for ImageNet-C), and
  **frost** scales the texture by 0.2 (as the script) or more when the image is larger than the
  scaled texture.
* ``"auto"`` — ``cifar`` for images ≤ 64 px on the longer side, else ``imagenet``.

Randomness: every image is corrupted under its own seed, derived from (``seed``, corruption,
severity, image index), so the output does not depend on ``workers`` or on the order of work, and
the same call reproduces the same files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from ..errors import CTTAError
from .domains import CORRUPTIONS, resolve_domains

SEVERITIES = (1, 2, 3, 4, 5)
PARAM_TABLES = ("auto", "cifar", "imagenet")
FORMATS = ("auto", "arrays", "folder")
JPEG_QUALITY = 85            # make_imagenet_c.py: Image.save(..., quality=85, optimize=True)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AUTO_CIFAR_MAX_SIDE = 64

#: make_cifar_c.py's per-severity parameters (severity 1..5), the CIFAR-10-C/CIFAR-100-C release
CIFAR_PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],                        # noise std
    "shot_noise": [500, 250, 100, 75, 50],                                    # Poisson photons
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],                          # s&p amount
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # disk radius, alias blur
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],  # sigma, max delta, iterations
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],             # radius, sigma
    "zoom_blur": [(1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)],  # arange(1, stop, step)
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],   # image weight, frost weight
    "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],           # strength, wibble decay
    "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],                                # HSV value shift
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],                                  # contrast factor
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    # ↑ × image side: displacement alpha, smoothing sigma, affine jitter
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],                               # down-scale factor
    "jpeg_compression": [80, 65, 58, 50, 40],                                 # JPEG quality
}


def _ic():
    """The imagecorruptions(-imaug) package, with an install hint when missing."""
    try:
        import imagecorruptions
        from imagecorruptions import corruptions as ic_corruptions
    except ImportError:
        raise CTTAError("make-corrupted needs the imagecorruptions-imaug package: "
                        "pip install imagecorruptions-imaug") from None
    return imagecorruptions, ic_corruptions


# --------------------------------------------------------------------------------- CIFAR table


def _cifar_gaussian_noise(x, c):
    x = x / 255.0
    return np.clip(x + np.random.normal(size=x.shape, scale=c), 0, 1) * 255


def _cifar_shot_noise(x, c):
    x = x / 255.0
    return np.clip(np.random.poisson(x * c) / float(c), 0, 1) * 255


def _cifar_impulse_noise(x, c, seed):
    import skimage as sk

    return np.clip(sk.util.random_noise(x / 255.0, mode="s&p", rng=int(seed), amount=c), 0, 1) * 255


def _cifar_defocus_blur(x, c):
    import cv2

    _, icc = _ic()
    kernel = icc.disk(radius=c[0], alias_blur=c[1])
    x = (x / 255.0).astype(np.float32)
    out = np.stack([cv2.filter2D(x[:, :, d], -1, kernel) for d in range(3)], axis=2)
    return np.clip(out, 0, 1) * 255


def _glass_shuffle(x, max_delta, iterations):
    """make_cifar_c's local pixel shuffle over the image's own size (offsets drawn up front)."""
    h, w = x.shape[:2]
    hs = range(h - max_delta, max_delta, -1)
    ws = range(w - max_delta, max_delta, -1)
    offs = np.random.randint(-max_delta, max_delta, size=(iterations, len(hs), len(ws), 2))
    for it in range(iterations):
        for i, hh in enumerate(hs):
            for j, ww in enumerate(ws):
                dx, dy = offs[it, i, j]
                hp, wp = hh + dy, ww + dx
                tmp = x[hh, ww].copy()
                x[hh, ww] = x[hp, wp]
                x[hp, wp] = tmp
    return x


def _cifar_glass_blur(x, c):
    from skimage.filters import gaussian

    x = np.uint8(gaussian(x / 255.0, sigma=c[0], channel_axis=-1) * 255)
    x = _glass_shuffle(x, c[1], c[2])
    return np.clip(gaussian(x / 255.0, sigma=c[0], channel_axis=-1), 0, 1) * 255


def _cifar_motion_blur(x, c):
    _, icc = _ic()
    out = icc._motion_blur(x.astype(np.float32), radius=c[0], sigma=c[1], angle=np.random.uniform(-45, 45))
    return np.clip(out, 0, 255)


def _clipped_zoom(img, zoom):
    """Zoom into the center by ``zoom`` and trim back to the input size (make_cifar_c ``clipped_zoom``)."""
    from scipy.ndimage import zoom as scizoom

    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / zoom)), int(np.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    out = scizoom(img[top : top + ch, left : left + cw], (zoom, zoom) + (1,) * (img.ndim - 2), order=1)
    th, tw = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[th : th + h, tw : tw + w]


def _cifar_zoom_blur(x, c):
    x = (x / 255.0).astype(np.float32)
    zooms = np.arange(1, c[0], c[1])
    out = np.zeros_like(x)
    for z in zooms:
        out += _clipped_zoom(x, z)
    return np.clip((x + out) / (len(zooms) + 1), 0, 1) * 255


def _cifar_snow(x, c):
    import cv2

    _, icc = _ic()
    x = np.asarray(x, dtype=np.float32) / 255.0
    h, w = x.shape[:2]
    layer = np.random.normal(size=(h, w), loc=c[0], scale=c[1])
    layer = _clipped_zoom(layer[..., None], c[2])[..., 0]
    layer[layer < c[3]] = 0
    layer = np.clip(layer, 0, 1)
    layer = icc._motion_blur(layer, radius=c[4], sigma=c[5], angle=np.random.uniform(-135, -45))
    layer = (np.round(np.clip(layer, 0, 1) * 255).astype(np.uint8) / 255.0)[..., None]
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(h, w, 1)
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255


@lru_cache(maxsize=8)
def _frost_texture(i: int) -> np.ndarray:
    import importlib.resources

    import cv2

    name = ["frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg"][i]
    ref = importlib.resources.files("imagecorruptions") / "frost" / name
    with importlib.resources.as_file(ref) as path:
        img = cv2.imread(str(path))
    if img is None:
        raise CTTAError(f"frost texture {name} is missing from the imagecorruptions package: reinstall imagecorruptions-imaug")
    return img


def _cifar_frost(x, c):
    import cv2

    h, w = x.shape[:2]
    tex = _frost_texture(np.random.randint(5))            # make_cifar_c: frost1..frost5
    scale = max(0.2, (h + 1) / tex.shape[0], (w + 1) / tex.shape[1])
    tex = cv2.resize(tex, (0, 0), fx=scale, fy=scale)
    top, left = np.random.randint(0, tex.shape[0] - h), np.random.randint(0, tex.shape[1] - w)
    tex = tex[top : top + h, left : left + w][..., [2, 1, 0]]
    return np.clip(c[0] * x.astype(np.float64) + c[1] * tex, 0, 255)


def _cifar_fog(x, c):
    _, icc = _ic()
    h, w = x.shape[:2]
    size = 1 << max(1, int(np.ceil(np.log2(max(h, w)))))
    x = x / 255.0
    max_val = x.max()
    x = x + c[0] * icc.plasma_fractal(mapsize=size, wibbledecay=c[1])[:h, :w][..., None]
    return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def _cifar_brightness(x, c):
    import skimage as sk

    hsv = sk.color.rgb2hsv(x / 255.0)
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
    return np.clip(sk.color.hsv2rgb(hsv), 0, 1) * 255


def _cifar_contrast(x, c):
    x = x / 255.0
    means = np.mean(x, axis=(0, 1), keepdims=True)
    return np.clip((x - means) * c + means, 0, 1) * 255


def _cifar_elastic(x, c):
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    img = np.asarray(x, dtype=np.float32) / 255.0
    h, w = img.shape[:2]
    side = min(h, w)
    alpha, sigma, jitter = (side * v for v in c)
    center = np.float32((h, w)) // 2
    sq = side // 3
    pts1 = np.float32([center + sq, [center[0] + sq, center[1] - sq], center - sq])
    pts2 = pts1 + np.random.uniform(-jitter, jitter, size=pts1.shape).astype(np.float32)
    m = cv2.getAffineTransform(pts1, pts2)
    img = cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT_101)
    dx = (gaussian(np.random.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    dy = (gaussian(np.random.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
    xx, yy, zz = np.meshgrid(np.arange(w), np.arange(h), np.arange(3))
    coords = (np.reshape(yy + dy[..., None], (-1, 1)), np.reshape(xx + dx[..., None], (-1, 1)), np.reshape(zz, (-1, 1)))
    out = map_coordinates(img, coords, order=1, mode="reflect").reshape(img.shape)
    return np.clip(out, 0, 1) * 255


def _cifar_pixelate(x, c):
    from PIL import Image

    h, w = x.shape[:2]
    img = Image.fromarray(x).resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
    return np.asarray(img)


def _cifar_jpeg(x, c):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=int(c))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


_CIFAR_FUNCS: dict[str, Callable] = {
    "gaussian_noise": _cifar_gaussian_noise, "shot_noise": _cifar_shot_noise,
    "impulse_noise": _cifar_impulse_noise, "defocus_blur": _cifar_defocus_blur,
    "glass_blur": _cifar_glass_blur, "motion_blur": _cifar_motion_blur, "zoom_blur": _cifar_zoom_blur,
    "snow": _cifar_snow, "frost": _cifar_frost, "fog": _cifar_fog, "brightness": _cifar_brightness,
    "contrast": _cifar_contrast, "elastic_transform": _cifar_elastic, "pixelate": _cifar_pixelate,
    "jpeg_compression": _cifar_jpeg,
}


# --------------------------------------------------------------------------------- one image


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """The per-image seed: a pure function of (seed, corruption, severity, image index)."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, CORRUPTIONS.index(corruption), int(severity), int(index)])
    return int(ss.generate_state(1)[0])


@contextmanager
def _global_numpy_seed(s: int):
    """imagecorruptions draws from numpy's global RNG: seed it for one image, then restore it."""
    state = np.random.get_state()
    np.random.seed(s)
    try:
        yield
    finally:
        np.random.set_state(state)


def resolve_params(params: str, height: int, width: int) -> str:
    if params not in PARAM_TABLES:
        raise CTTAError(f"unknown parameter table '{params}': use {', '.join(PARAM_TABLES)}")
    if params == "auto":
        return "cifar" if max(height, width) <= AUTO_CIFAR_MAX_SIDE else "imagenet"
    return params


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int = 0, params: str = "auto") -> np.ndarray:
    """One uint8 (H, W, 3) image under ``corruption`` at ``severity`` (1..5) → uint8 (H, W, 3).

    ``seed`` fixes every random draw (use :func:`image_seed` for a data set). ``params``: see the
    module docstring. The float result is truncated to uint8 as ``make_*_c.py`` do (``np.uint8``).
    """
    if corruption not in CORRUPTIONS:
        raise CTTAError(f"unknown corruption '{corruption}'; available: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise CTTAError(f"severity must be 1..5, got {severity}")
    img = np.ascontiguousarray(image, dtype=np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise CTTAError(f"expected an RGB image (H, W, 3), got shape {img.shape}")
    table = resolve_params(params, img.shape[0], img.shape[1])
    with _global_numpy_seed(seed):
        if table == "cifar":
            c = CIFAR_PARAMS[corruption][severity - 1]
            fn = _CIFAR_FUNCS[corruption]
            out = fn(img, c, seed) if corruption == "impulse_noise" else fn(img, c)
        else:
            if min(img.shape[:2]) < 32:
                raise CTTAError(f"the ImageNet-C parameter table needs images of at least 32×32, got "
                                f"{img.shape[1]}×{img.shape[0]}: use params='cifar'")
            ic, _ = _ic()
            kw = {"seed": int(seed)} if corruption in ("glass_blur", "impulse_noise") else {}
            out = ic.corrupt(img, severity=severity, corruption_name=corruption, **kw)
    return np.uint8(np.clip(np.asarray(out, dtype=np.float64), 0, 255))


def _corrupt_chunk(args) -> np.ndarray:
    images, corruption, severity, seed, params, first = args
    return np.stack([
        corrupt_image(im, corruption, severity, image_seed(seed, corruption, severity, first + i), params)
        for i, im in enumerate(images)
    ]) if len(images) else np.zeros((0,) + tuple(images.shape[1:]), np.uint8)


# --------------------------------------------------------------------------------- data sets


def _parse_corruptions(corruptions) -> list[str]:
    """None (all 15) | "a,b" | a list, full or short names → full names."""
    if corruptions is None:
        return list(CORRUPTIONS)
    if isinstance(corruptions, str):
        corruptions = corruptions.split(",")
    names = [c.strip() for c in corruptions if c.strip()]
    if not names:
        raise CTTAError("no corruptions selected")
    return resolve_domains(names, CORRUPTIONS)


def _parse_severities(severities) -> list[int]:
    if isinstance(severities, str):
        severities = [s for s in severities.split(",") if s.strip()]
    try:
        out = sorted({int(s) for s in severities})
    except (TypeError, ValueError):
        raise CTTAError(f"severities must be integers 1..5, got {severities!r}") from None
    if not out or any(s not in SEVERITIES for s in out):
        raise CTTAError(f"severities must be in 1..5, got {severities!r}")
    return out


def detect_format(src: Path) -> str:
    """``arrays`` for a CIFAR-style array/pickle source, ``folder`` for class-per-folder images."""
    from .cifar_c import locate_clean_arrays

    if not src.exists():
        raise CTTAError(f"source data not found: {src}")
    try:
        locate_clean_arrays(src)
        return "arrays"
    except CTTAError:
        pass
    if src.is_dir() and any(e.is_dir() for e in os.scandir(src)):
        return "folder"
    raise CTTAError(f"cannot tell the format of {src}: expected a CIFAR python batch / test_images.npy + "
                    f"test_labels.npy (arrays) or a folder of class folders with images (folder)")


def _folder_samples(src: Path) -> list[tuple[str, Path]]:
    """(class name, file) for every image of a class-per-folder tree, ImageFolder order."""
    samples = []
    for cls in sorted(e.name for e in os.scandir(src) if e.is_dir()):
        for root, _, files in sorted(os.walk(src / cls)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((cls, Path(root) / f))
    if not samples:
        raise CTTAError(f"no images found under {src}/<class>/")
    return samples


def _file_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{p}:{st.st_size}".encode())
    return h.hexdigest()[:16]


def make_corrupted(
    src, out, corruptions: Optional[Sequence[str] | str] = None, severities: Sequence[int] | str = SEVERITIES,
    fmt: str = "auto", seed: int = 0, progress: Optional[Callable[[int, int, str], None]] = None,
    params: str = "auto", workers: int = 1, resize: Optional[int] = None, crop: Optional[int] = None,
    chunk: int = 256,
) -> Path:
    """Build the -C version of a clean data set ``src`` under ``out`` (module docstring: layouts,
    parameter tables, seeding). Returns ``out``.

    ``progress(done, total, what)`` is called after each chunk of images. ``fmt="arrays"`` needs
    all five severities (the layout stacks them in one file). ``resize``/``crop`` (folder format):
    torchvision ``Resize``/``CenterCrop`` applied before corrupting (ImageNet-C: 256 / 224).
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    names = _parse_corruptions(corruptions)
    sevs = _parse_severities(severities)
    if fmt not in FORMATS:
        raise CTTAError(f"unknown format '{fmt}': use {', '.join(FORMATS)}")
    if params not in PARAM_TABLES:
        raise CTTAError(f"unknown parameter table '{params}': use {', '.join(PARAM_TABLES)}")
    if workers < 1:
        raise CTTAError(f"workers must be >= 1, got {workers}")
    _ic()
    fmt = detect_format(src) if fmt == "auto" else fmt
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "arrays":
        if sevs != list(SEVERITIES):
            raise CTTAError("the CIFAR-style layout stacks severities 1..5 in one file: build all five "
                            "(--severities 1,2,3,4,5) or use the folder format")
        info = _make_arrays(src, out, names, seed, progress, params, workers, chunk)
    else:
        info = _make_folder(src, out, names, sevs, seed, progress, params, workers, resize, crop, chunk)
    from .. import __version__

    manifest = {"source": str(src), "format": fmt, "corruptions": names, "severities": sevs, "seed": seed,
                "params": info.pop("params"), "ctta_bench": __version__, **info}
    tmp = out / ".make_corrupted.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "make_corrupted.json")
    return out


def _run_chunks(tasks, workers: int):
    if workers <= 1:
        for t in tasks:
            yield t, _corrupt_chunk(t)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from zip(tasks, pool.map(_corrupt_chunk, tasks))


def _make_arrays(src, out, names, seed, progress, params, workers, chunk) -> dict:
    from .cifar_c import load_clean_arrays, locate_clean_arrays

    fmt, images_path, labels_path = locate_clean_arrays(src)
    x, y = load_clean_arrays(fmt, images_path, labels_path)
    n, h, w = x.shape[:3]
    table = resolve_params(params, h, w)
    lab = np.tile(y, len(SEVERITIES))
    lab = lab.astype(np.uint8) if len(lab) and lab.max() < 256 and lab.min() >= 0 else lab.astype(np.int64)
    tmp = out / ".labels.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, lab)
    os.replace(tmp, out / "labels.npy")
    total, done = len(names) * len(SEVERITIES) * n, 0
    for name in names:
        tmp = out / f".{name}.npy.tmp"
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(SEVERITIES) * n, h, w, 3))
        tasks = [(x[i : i + chunk], name, s, seed, table, i) for s in SEVERITIES for i in range(0, n, chunk)]
        for (imgs, _, s, _, _, first), res in _run_chunks(tasks, workers):
            arr[(s - 1) * n + first : (s - 1) * n + first + len(imgs)] = res
            done += len(imgs)
            if progress:
                progress(done, total, f"{name} s{s}")
        arr.flush()
        del arr
        os.replace(tmp, out / f"{name}.npy")   # a killed build never leaves a complete-looking file
    return {"params": table, "images": int(n), "source_files": [str(images_path)]}


def _load_rgb(path: Path, resize, crop) -> np.ndarray:
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
    except OSError as e:
        raise CTTAError(f"cannot read source image {path}: {e}") from None
    if resize or crop:
        from .. import _compat

        _compat.ensure_torchvision_importable()
        from torchvision.transforms import functional as TF

        if resize:
            img = TF.resize(img, resize)
        if crop:
            img = TF.center_crop(img, crop)
    return np.asarray(img, dtype=np.uint8)


def _folder_chunk(args):
    files, classes, name, s, seed, params, first, out, resize, crop = args
    from PIL import Image

    for i, (path, cls) in enumerate(zip(files, classes)):
        img = _load_rgb(Path(path), resize, crop)
        res = corrupt_image(img, name, s, image_seed(seed, name, s, first + i), params)
        dst = Path(out) / name / str(s) / cls / (Path(path).stem + ".JPEG")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name("." + dst.name + ".tmp")
        Image.fromarray(res).save(tmp, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        os.replace(tmp, dst)
    return len(files)


def _make_folder(src, out, names, sevs, seed, progress, params, workers, resize, crop, chunk) -> dict:
    samples = _folder_samples(src)
    first = _load_rgb(samples[0][1], resize, crop)
    table = resolve_params(params, first.shape[0], first.shape[1])
    files = [str(p) for _, p in samples]
    classes = [c for c, _ in samples]
    tasks = [(files[i : i + chunk], classes[i : i + chunk], name, s, seed, table, i, str(out), resize, crop)
             for name in names for s in sevs for i in range(0, len(files), chunk)]
    total, done = len(files) * len(names) * len(sevs), 0
    if workers <= 1:
        results = ((t, _folder_chunk(t)) for t in tasks)
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = zip(tasks, pool.map(_folder_chunk, tasks))
    try:
        for t, k in results:
            done += k
            if progress:
                progress(done, total, f"{t[2]} s{t[3]}")
    finally:
        if workers > 1:
            pool.shutdown()
    return {"params": table, "images": len(files), "source_digest": _file_digest(Path(f) for f in files[:1000])}
