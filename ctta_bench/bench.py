"""``ctta-bench bench``: the cost of one adaptation step of each method, measured on synthetic input.

For every method the same freshly seeded model is built and wrapped, ``warmup`` untimed steps
run, then ``steps`` timed steps on random [0, 1] batches of the model's input size. Reported per
method: img/s, ms per batch split into forward / backward / update / method overhead, forward
and backward passes per image, host syncs per batch, full model copies held, peak memory, and
trainable / total parameters (``Method.parameter_counts()``).

How time is split without touching the methods (docs/performance.md):

* **forward** — forward pre/post hooks on every *full model copy* the method holds (student,
  teacher, anchor): the topmost submodules of the method whose class is the student's class or
  the class of the network under its normalisation wrapper. Each call also counts one forward
  pass for each image of its input.
* **backward** — ``torch.autograd.backward`` and ``torch.autograd.grad`` wrapped for the duration
  of the measured steps (``Tensor.backward`` calls the former).
* **update** — the global optimiser step pre/post hooks (``register_optimizer_step_pre_hook``).
* **method overhead** — total − forward − backward − update: losses, EMA, restore, augmentation,
  bookkeeping.

Phases are timed exclusively (a phase entered inside another pauses the outer one). On CUDA the
device is synchronised at every phase boundary; since that serialises host and device, the
throughput (img/s, ms per batch) then comes from a second, uninstrumented pass. On the CPU the
hooks cost microseconds per call and one instrumented pass gives both.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import registry
from .errors import CTTAError
from .meters import PeakMemory, current_mem_mb, release_freed_memory, synchronize

#: columns of the saved table, in order
COLUMNS = [
    "method", "status", "model", "device", "batch_size", "image_size", "steps",
    "img_per_s", "ms_per_batch", "forward_ms", "backward_ms", "update_ms", "overhead_ms",
    "forward_per_img", "backward_per_img", "updates_per_batch", "host_syncs_per_batch",
    "model_copies", "forward_by_copy", "peak_mem_mb", "step_mem_mb",
    "trainable_params", "total_params", "note",
]
PHASES = ("forward", "backward", "update")


@dataclass
class BenchOptions:
    methods: list[str] = field(default_factory=list)   # empty: every registered method
    model: str = "small_cnn"
    batch_size: int = 64
    device: str = "auto"
    steps: int = 10
    warmup: int = 3
    image_size: Optional[int] = None     # default: the model's input size
    num_classes: Optional[int] = None    # default: 10 (built-ins) or the timm model's own
    seed: int = 0
    amp: Optional[str] = None            # bf16 | fp16 (GPU path)
    channels_last: bool = False
    compile: bool = False                # GPU path
    hyperparameters: dict[str, dict] = field(default_factory=dict)  # method -> overrides
    count_syncs: bool = True             # one extra untimed step per method under a sync counter
    threads: Optional[int] = None        # torch CPU threads (default: torch's choice)

    def validate(self) -> None:
        checks = [(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
                  (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
                  (self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}"),
                  (self.image_size is None or self.image_size >= 8, f"--image-size must be >= 8, got {self.image_size}"),
                  (self.num_classes is None or self.num_classes >= 2, f"--num-classes must be >= 2, got {self.num_classes}"),
                  (self.amp in (None, "bf16", "fp16"), f"--amp must be bf16 or fp16, got {self.amp}"),
                  (self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")]
        for ok, msg in checks:
            if not ok:
                raise CTTAError(msg)


@dataclass
class BenchResult:
    rows: list[dict]
    notes: list[str]
    meta: dict


# ------------------------------------------------------------------------------------- models


@dataclass
class BenchModel:
    """A source-model recipe: ``build()`` returns a fresh model (normalisation inside, as runs use)."""

    name: str
    image_size: int
    num_classes: int
    is_vit: bool
    description: str
    _build: Callable[[], nn.Module]

    def build(self) -> nn.Module:
        return self._build()


def resolve_model(name: str, image_size: Optional[int] = None, num_classes: Optional[int] = None) -> BenchModel:
    """The built-ins ``small_cnn``/``tiny_vit`` (the suites' architectures) or any timm model name
    (``pretrained=False``: random weights; cost does not depend on the weights)."""
    from . import _compat
    from .models.builtin import BUILTIN
    from .models.wrapper import Normalized, find_vision_transformer

    if name in BUILTIN:
        from .models.source_training import MEAN, RECIPES, STD

        size = image_size or 32
        classes = num_classes or 10
        kwargs = dict(RECIPES.get(name, {}).get("arch", {}))
        if name == "tiny_vit":
            kwargs["img_size"] = size
            if size % int(kwargs.get("patch_size", 4)):
                raise CTTAError(f"tiny_vit needs an --image-size divisible by its patch size {kwargs.get('patch_size')}")

        def build() -> nn.Module:
            return Normalized(BUILTIN[name](num_classes=classes, **kwargs), MEAN, STD)

        return BenchModel(name, size, classes, name == "tiny_vit", f"builtin:{name}", build)

    _compat.ensure_torchvision_importable()
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        hint = f" (similar timm names: {', '.join(close)})" if close else ""
        raise CTTAError(f"unknown model '{name}': use small_cnn, tiny_vit or a timm model name{hint}")

    def create(**extra) -> nn.Module:
        kw = dict(pretrained=False, **extra)
        if num_classes:
            kw["num_classes"] = num_classes
        if image_size:
            try:
                return timm.create_model(name, img_size=image_size, **kw)
            except TypeError:  # a CNN: any input size works without the argument
                pass
        return timm.create_model(name, **kw)

    probe = create()
    cfg = getattr(probe, "pretrained_cfg", None) or {}
    size = image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    classes = int(getattr(probe, "num_classes", num_classes or 1000))
    mean, std = cfg.get("mean"), cfg.get("std")
    is_vit = find_vision_transformer(probe) is not None
    del probe

    def build() -> nn.Module:
        return Normalized(create(), mean, std)

    return BenchModel(name, size, classes, is_vit, f"timm:{name}", build)


def full_model_copies(method: nn.Module) -> list[tuple[str, nn.Module]]:
    """(attribute path, module) of every full model the method holds (student, teacher, anchor):
    the topmost submodules whose class is the student's or that of the network it wraps."""
    from .models.wrapper import unwrap

    student = method.model
    kinds = {type(student), type(unwrap(student))}
    out: list[tuple[str, nn.Module]] = []
    for name, m in method.named_modules():
        if not name or any(name.startswith(p + ".") for p, _ in out):
            continue
        if type(m) in kinds:
            out.append((name, m))
    return out


# -------------------------------------------------------------------------------- phase timing


class PhaseClock:
    """Exclusive wall time per phase: entering a phase inside another pauses the outer one."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.sync = self.device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.calls = dict.fromkeys(PHASES, 0)
        self.copy_seconds: dict[str, float] = {}
        self.copy_images: dict[str, int] = {}
        self._stack: list[tuple[str, Optional[str]]] = []
        self._last = 0.0

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def push(self, phase: str, copy: Optional[str] = None, images: int = 0) -> None:
        t = self.now()
        if self._stack:
            self._charge(self._stack[-1], t - self._last)
        self._stack.append((phase, copy))
        self.calls[phase] += 1
        if copy is not None:
            self.copy_images[copy] = self.copy_images.get(copy, 0) + images
        self._last = t

    def pop(self) -> None:
        t = self.now()
        if self._stack:
            self._charge(self._stack.pop(), t - self._last)
        self._last = t

    def _charge(self, entry: tuple[str, Optional[str]], dt: float) -> None:
        phase, copy = entry
        self.seconds[phase] += dt
        if copy is not None:
            self.copy_seconds[copy] = self.copy_seconds.get(copy, 0.0) + dt


@contextlib.contextmanager
def instrument(method: nn.Module, clock: PhaseClock) -> Iterator[list[str]]:
    """Hooks on the method's full model copies, timed autograd entry points and global optimiser
    step hooks, all removed on exit. Yields the names of the hooked model copies."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    handles = []
    copies = full_model_copies(method)
    for name, module in copies:
        def pre(mod, args, _name=name):
            x = args[0] if args else None
            clock.push("forward", _name, int(x.shape[0]) if isinstance(x, Tensor) and x.dim() else 0)

        def post(mod, args, out):
            clock.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    handles.append(register_optimizer_step_pre_hook(lambda opt, args, kwargs: clock.push("update")))
    handles.append(register_optimizer_step_post_hook(lambda opt, args, kwargs: clock.pop()))

    originals = {"backward": torch.autograd.backward, "grad": torch.autograd.grad}

    def timed(fn):
        def wrapper(*args, **kwargs):
            clock.push("backward")
            try:
                return fn(*args, **kwargs)
            finally:
                clock.pop()
        return wrapper

    torch.autograd.backward = timed(originals["backward"])
    torch.autograd.grad = timed(originals["grad"])
    try:
        yield [n for n, _ in copies]
    finally:
        torch.autograd.backward = originals["backward"]
        torch.autograd.grad = originals["grad"]
        for h in handles:
            h.remove()


# -------------------------------------------------------------------------------- host syncs

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_OVERRIDES = str(Path(torch.overrides.__file__).resolve())


def _is_bool_index(args: tuple) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


#: Tensor methods / torch functions that make the host wait for the device (value read back to
#: Python, or an output whose size depends on the data)
_READS = {Tensor.item, Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.__bool__, Tensor.__int__,
          Tensor.__float__, Tensor.__index__, Tensor.nonzero, torch.nonzero, Tensor.masked_select,
          torch.masked_select, torch.unique, Tensor.unique, torch.unique_consecutive,
          Tensor.unique_consecutive, torch.argwhere, Tensor.argwhere}


class HostSyncCounter(TorchFunctionMode):
    """Counts calls that force a device→host sync (``.item()``, ``bool(t)``, ``.cpu()``,
    ``.tolist()``, ``nonzero``, boolean-mask indexing, one-argument ``torch.where`` …) made by
    code *outside* torch (methods, the harness, timm). On a CPU these calls cost nothing, but
    the same code syncs on every batch on a GPU, so counting them on the CPU finds them.
    torch's own internals are not counted (e.g. Adam reads its CPU-resident step counter).

    On a CPU every tensor is a host tensor, so the count there is an upper bound: it includes
    reads of tensors a method deliberately keeps on the CPU. With ``device`` a GPU, only calls
    on tensors living on that kind of device are counted.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.device_type = torch.device(device).type
        self.calls: list[tuple[str, str]] = []  # (function, "file:line")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if ((func in _READS or (func is Tensor.__getitem__ and _is_bool_index(args))
                or (func is torch.where and len(args) + len(kwargs) == 1)) and self._on_device(args)):
            where = non_torch_caller(sys._getframe(1))
            if where is not None:
                self.calls.append((getattr(func, "__name__", str(func)), where))
        return func(*args, **kwargs)

    def _on_device(self, args: tuple) -> bool:
        if self.device_type == "cpu":
            return True
        return any(isinstance(a, Tensor) and a.device.type == self.device_type for a in args)

    def summary(self) -> str:
        """``"__bool__ methods/cotta.py:193 ×1, ..."`` (short paths), most frequent first."""
        from collections import Counter

        counts = Counter((fn, _short(loc)) for fn, loc in self.calls)
        return ", ".join(f"{fn} {loc} ×{k}" for (fn, loc), k in counts.most_common())


def non_torch_caller(frame) -> Optional[str]:
    """``"file:line"`` of the code that called a torch function, given the frame of the caller
    of ``__torch_function__``; None when that code is torch itself. A call that went through
    torch's Python wrapper (``handle_torch_function``) is traced past the wrapper."""
    f = frame
    if f is not None and _resolved(f.f_code.co_filename) == _OVERRIDES:
        f = f.f_back.f_back if f.f_back is not None else None
    if f is None or _resolved(f.f_code.co_filename).startswith(_TORCH_DIR):
        return None
    return f"{f.f_code.co_filename}:{f.f_lineno}"


@functools.lru_cache(maxsize=None)
def _resolved(path: str) -> str:
    return str(Path(path).resolve())


# ---------------------------------------------------------------------------------- memory


# ---------------------------------------------------------------------------------- measuring


def resolve_device(name: str) -> torch.device:
    from .runner import resolve_device as _resolve

    return _resolve(name)


def _amp_context(opts: BenchOptions, device: torch.device, notes: list[str]):
    if not opts.amp:
        return contextlib.nullcontext()
    if device.type != "cuda":
        notes.append(f"--amp {opts.amp} is a GPU path: running in float32 on {device}")
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[opts.amp])


def method_names(requested: list[str]) -> list[str]:
    reg = registry.methods()
    if not requested or requested == ["all"]:
        return list(reg)
    names = []
    for n in requested:
        registry.get(n)  # unknown name: CTTAError listing the valid ones
        if n not in names:
            names.append(n)
    return names


def run_bench(opts: BenchOptions, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Measure every requested method; returns rows in :data:`COLUMNS` order plus notes."""
    opts.validate()
    names = method_names(opts.methods)
    unknown = set(opts.hyperparameters) - set(names)
    if unknown:
        raise CTTAError(f"--set names method(s) not being measured: {', '.join(sorted(unknown))}")
    configs = {n: registry.make_config(n, **opts.hyperparameters.get(n, {})) for n in names}  # fail fast
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    bm = resolve_model(opts.model, opts.image_size, opts.num_classes)
    notes: list[str] = []
    amp = _amp_context(opts, device, notes)
    if opts.compile and device.type != "cuda":
        notes.append(f"--compile is a GPU path: running eagerly on {device}")
    _warm_process(bm, opts, device)
    rows = []
    for n in names:
        if progress:
            progress(n)
        rows.append(_measure(n, configs[n], bm, opts, device, amp, notes))
    from .results import git_sha, host, now, versions

    meta = {"created": now(), "host": host(), "git_sha": git_sha(), "versions": versions(),
            "device": str(device), "torch_threads": torch.get_num_threads(),
            "model": bm.description, "image_size": bm.image_size, "num_classes": bm.num_classes,
            "batch_size": opts.batch_size, "steps": opts.steps, "warmup": opts.warmup, "seed": opts.seed,
            "amp": opts.amp, "channels_last": opts.channels_last, "compile": opts.compile,
            "hyperparameters": opts.hyperparameters}
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
    return BenchResult(rows, notes, meta)


def _warm_process(bm: BenchModel, opts: BenchOptions, device: torch.device) -> None:
    """One throwaway forward/backward/Adam step, so that library code and thread pools touched
    by the first step are resident before any method is measured (otherwise the first method's
    memory and time would carry them)."""
    torch.manual_seed(opts.seed)
    model = bm.build().to(device)
    x = torch.rand(opts.batch_size, 3, bm.image_size, bm.image_size, device=device)
    opt = torch.optim.Adam(model.parameters())
    model(x).logsumexp(1).mean().backward()
    opt.step()
    with torch.no_grad():
        model.eval()(x)
    synchronize(device)
    del model, x, opt
    release_freed_memory(device)


def _measure(name: str, cfg: Any, bm: BenchModel, opts: BenchOptions, device: torch.device, amp,
             notes: list[str]) -> dict:
    cls = registry.get(name)
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(method=name, model=bm.name, device=str(device), batch_size=opts.batch_size,
               image_size=bm.image_size, steps=opts.steps)
    if cls.requires == "vit" and not bm.is_vit:
        row.update(status="skipped", note=f"needs a ViT (timm VisionTransformer); {bm.name} is not one")
        return row

    torch.manual_seed(opts.seed)
    model = bm.build().to(device)
    if opts.channels_last:
        model = model.to(memory_format=torch.channels_last)
    method = cls(model, cfg).to(device)
    notes.extend(dict.fromkeys(method.notes))
    copies = full_model_copies(method)
    if opts.compile and device.type == "cuda":
        # after the method is built (methods inject adapters/prompts and copy the model), each copy
        # compiles its own network's forward; the hooks stay on the uncompiled wrappers
        for _, m in copies:
            inner = getattr(m, "model", m)
            inner.forward = torch.compile(inner.forward)
    gen = torch.Generator(device="cpu").manual_seed(opts.seed + 1)
    shape = (opts.batch_size, 3, bm.image_size, bm.image_size)
    inputs = [torch.rand(shape, generator=gen).to(device) for _ in range(min(2, opts.warmup + opts.steps))]
    if opts.channels_last:
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]

    def step(i: int) -> None:
        with amp:
            method(inputs[i % len(inputs)])

    release_freed_memory(device)
    meter = PeakMemory(device)
    meter.reset()
    base_mb = current_mem_mb(device)
    for i in range(opts.warmup):
        step(i)

    clock = PhaseClock(device)
    with instrument(method, clock):
        synchronize(device)
        t0 = time.perf_counter()
        for i in range(opts.steps):
            step(opts.warmup + i)
        synchronize(device)
        split_total = time.perf_counter() - t0
    total = split_total
    if device.type == "cuda":  # the synced phase boundaries serialise host and device: time again
        synchronize(device)
        t0 = time.perf_counter()
        for i in range(opts.steps):
            step(i)
        synchronize(device)
        total = time.perf_counter() - t0
    peak_mb = meter.peak_mb()

    syncs = None
    if opts.count_syncs and not (opts.compile and device.type == "cuda"):
        counter = HostSyncCounter(device)
        with counter:
            step(0)
        syncs = len(counter.calls)
        if counter.calls:
            row["note"] = f"host reads per batch: {counter.summary()}"

    s, images = opts.steps, opts.steps * opts.batch_size
    fwd, bwd, upd = (clock.seconds[p] for p in PHASES)
    counts = method.parameter_counts()
    row.update(
        status="ok",
        img_per_s=images / max(total, 1e-12),
        ms_per_batch=1e3 * total / s,
        forward_ms=1e3 * fwd / s, backward_ms=1e3 * bwd / s, update_ms=1e3 * upd / s,
        overhead_ms=1e3 * max(split_total - fwd - bwd - upd, 0.0) / s,
        forward_per_img=sum(clock.copy_images.values()) / images,
        backward_per_img=clock.calls["backward"] / s,
        updates_per_batch=clock.calls["update"] / s,
        host_syncs_per_batch=syncs,
        model_copies=len(copies),
        forward_by_copy="; ".join(
            f"{c} {clock.copy_images.get(c, 0) / images:g}x {1e3 * clock.copy_seconds.get(c, 0.0) / s:.3g} ms"
            for c, _ in copies),
        peak_mem_mb=peak_mb,
        step_mem_mb=None if base_mb is None else max(peak_mb - base_mb, 0.0),
        trainable_params=int(counts["trainable"]), total_params=int(counts["total"]),
    )
    del method, model, inputs
    release_freed_memory(device)
    return row


def _short(path_line: str) -> str:
    path, _, line = path_line.rpartition(":")
    parts = Path(path).parts
    return f"{'/'.join(parts[-2:])}:{line}"


# ---------------------------------------------------------------------------------- output


def save(result: BenchResult, path: Path) -> None:
    """``.csv`` (the table) or ``.json`` (``{"meta": ..., "rows": ...}``), written atomically."""
    from .results import write_csv, write_json

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise CTTAError(f"--out must end in .csv or .json, got {path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CTTAError(f"cannot create {path.parent}: {e.strerror}") from None
    if suffix == ".csv":
        write_csv(path, result.rows, COLUMNS)
    else:
        write_json(path, {"meta": result.meta, "rows": result.rows, "notes": result.notes})


def table(result: BenchResult, title: str):
    """A rich table of the measured rows (skipped methods show their reason)."""
    from rich.table import Table

    t = Table(title=title)
    cols = [("method", "left"), ("img/s", "right"), ("ms/batch", "right"), ("fwd ms", "right"),
            ("bwd ms", "right"), ("update ms", "right"), ("overhead ms", "right"), ("fwd/img", "right"),
            ("bwd/img", "right"), ("syncs/batch", "right"), ("copies", "right"), ("peak MB", "right"),
            ("+step MB", "right"), ("trainable", "right"), ("total", "right")]
    for c, j in cols:
        t.add_column(c, justify=j, style="bold cyan" if c == "method" else None)
    for r in result.rows:
        if r["status"] != "ok":
            t.add_row(r["method"], f"[dim]{r['status']}[/]", *[""] * (len(cols) - 2))
            continue
        t.add_row(
            r["method"], f"{r['img_per_s']:.1f}", f"{r['ms_per_batch']:.2f}", f"{r['forward_ms']:.2f}",
            f"{r['backward_ms']:.2f}", f"{r['update_ms']:.2f}", f"{r['overhead_ms']:.2f}",
            f"{r['forward_per_img']:g}", f"{r['backward_per_img']:g}",
            "–" if r["host_syncs_per_batch"] is None else str(r["host_syncs_per_batch"]),
            str(r["model_copies"]), f"{r['peak_mem_mb']:.0f}",
            "–" if r["step_mem_mb"] is None else f"{r['step_mem_mb']:.0f}",
            f"{r['trainable_params']:,}", f"{r['total_params']:,}",
        )
    return t
