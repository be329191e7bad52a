"""The runner: suite + method → stream of batches → scored logits → rows, written as it goes.

Order of work (fail fast): resolve the suite and every override, validate the method's
hyperparameters, create the run folder, check the data files, and only then load the model.
At every segment boundary (and every ``checkpoint_every`` batches) the full adaptation state is
saved, so ``--resume RUN_DIR`` continues a killed run with identical results.
"""
from __future__ import annotations

import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch

from . import registry
from .config import apply_overrides, build_suite, load_suite_dict, read_yaml, suite_to_dict
from .errors import CTTAError, DivergedError
from .meters import PeakMemory, synchronize
from .results import (
    BATCH_COLUMNS, DOMAIN_COLUMNS, SOURCE_EVAL_COLUMNS, atomic_torch_save, host, git_sha,
    make_run_dir, new_run_id, now, versions, write_csv, write_json, write_yaml,
)
from .stream import Segment, build_stream, open_segment
from .typed import to_dict

STATE_VERSION = 1


class Interrupted(CTTAError):
    """The run received SIGINT/SIGTERM; its state was saved and it can be resumed."""

    exit_code = 130


@dataclass
class RunOptions:
    suite: str = "digits-c"
    method: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    out: Path = Path("results")
    overrides: list[str] = field(default_factory=list)
    data_root: Optional[str] = None
    resume: Optional[Path] = None
    force: bool = False
    amp: Optional[str] = None            # bf16 | fp16 (GPU paths, off by default)
    channels_last: bool = False
    compile: bool = False


class Reporter(Protocol):
    def note(self, text: str) -> None: ...
    def start_segment(self, seg: Segment, total: int, done: int) -> None: ...
    def update(self, done: int, errors: int, img_per_s: float) -> None: ...
    def end_segment(self, row: dict) -> None: ...


class NullReporter:
    def note(self, text: str) -> None:
        pass

    def start_segment(self, seg, total, done) -> None:
        pass

    def update(self, done, errors, img_per_s) -> None:
        pass

    def end_segment(self, row) -> None:
        pass


@dataclass
class RunResult:
    run_dir: Path
    rows: list[dict]
    summary: dict
    status: str


# ----------------------------------------------------------------------------------- resolving


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CTTAError("--device cuda was requested but no CUDA device is available; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise CTTAError(f"unknown device '{name}': use auto, cpu or cuda[:N]")


def resolve_config(opts: RunOptions) -> tuple[Any, str, Any, dict]:
    """(suite, method name, method Config, resolved config dict) — all validation, no heavy work."""
    names = sorted(registry.methods())
    raw = load_suite_dict(opts.suite)
    overrides = list(opts.overrides)
    if opts.data_root:
        overrides.append(f"dataset.root={opts.data_root}")
    raw, _ = apply_overrides(raw, overrides, names)
    suite = build_suite(raw)
    method_name = opts.method or suite.default_method
    cls = registry.get(method_name)
    for m in suite.methods:
        if m not in names:
            raise CTTAError(f"suite '{suite.name}' sets hyperparameters for unknown method '{m}'; available: {', '.join(names)}")
    hp = dict(suite.methods.get(method_name) or {})
    cfg = registry.make_config(method_name, **hp)
    resolved = {
        "suite": suite_to_dict(suite),
        "method": {"name": method_name, "hyperparameters": to_dict(cfg)},
        "run": {"seed": opts.seed, "device": opts.device, "amp": opts.amp,
                "channels_last": opts.channels_last, "compile": opts.compile,
                "overrides": list(opts.overrides), "data_root": opts.data_root},
    }
    if cls.requires == "vit":
        resolved["method"]["requires"] = "vit"
    return suite, method_name, cfg, resolved


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------- signals


class _StopFlag:
    def __init__(self):
        self.signum: Optional[int] = None

    def __call__(self, signum, frame):
        if self.signum is not None:  # second signal: stop at once
            raise KeyboardInterrupt
        self.signum = signum


@contextmanager
def _catch_signals(flag: _StopFlag):
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old[s] = signal.signal(s, flag)
        except ValueError:  # not in the main thread
            pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------- the run


class Run:
    """One run of one method on one suite (use :func:`run`)."""

    def __init__(self, opts: RunOptions, reporter: Reporter | None = None):
        self.opts = opts
        self.reporter = reporter or NullReporter()
        self.state: dict | None = None
        if opts.resume is not None:
            self._prepare_resume()
        else:
            self.suite, self.method_name, self.cfg, self.resolved = resolve_config(opts)
            self.device = resolve_device(opts.device)
            self.run_id = new_run_id(opts.seed)
            self.run_dir = make_run_dir(opts.out, self.suite.name, self.method_name, self.run_id)
        self.rows: list[dict] = []
        self.resets = 0  # divergence resets (on_divergence: reset)
        self.batch_rows: list[dict] = []
        self.source_rows: list[dict] = []
        self.manifest: dict = {}

    # -- resume ---------------------------------------------------------------------------------
    def _prepare_resume(self) -> None:
        run_dir = Path(self.opts.resume)
        state_file = run_dir / "state" / "latest.pt"
        if not (run_dir / "config.yaml").exists():
            raise CTTAError(f"{run_dir} is not a ctta-bench run folder (no config.yaml)")
        if not state_file.exists():
            raise CTTAError(f"{run_dir} has no saved state (state/latest.pt): it cannot be resumed")
        saved = read_yaml(run_dir / "config.yaml")
        run = saved.get("run", {})
        opts = RunOptions(
            suite=saved["suite"]["name"], method=saved["method"]["name"], seed=int(run.get("seed", 0)),
            device=self.opts.device if self.opts.device != "auto" else run.get("device", "auto"),
            out=run_dir.parent.parent.parent, overrides=[], data_root=None,
            amp=run.get("amp"), channels_last=bool(run.get("channels_last")), compile=bool(run.get("compile")),
        )
        # rebuild the suite from the saved, fully resolved mapping (not from the shipped file)
        suite = build_suite(saved["suite"])
        cfg = registry.make_config(saved["method"]["name"], **saved["method"]["hyperparameters"])
        self.suite, self.method_name, self.cfg = suite, saved["method"]["name"], cfg
        self.resolved = saved
        self.device = resolve_device(opts.device)
        self.run_dir = run_dir
        self.run_id = run_dir.name
        self.opts = RunOptions(**{**opts.__dict__, "resume": run_dir, "force": self.opts.force})
        self.state = torch.load(state_file, map_location="cpu", weights_only=False)
        diffs = []
        if self.state.get("version") != STATE_VERSION:
            diffs.append(f"state format {self.state.get('version')} → {STATE_VERSION}")
        from . import __version__

        if self.state.get("ctta_bench") != __version__:
            diffs.append(f"ctta-bench {self.state.get('ctta_bench')} → {__version__}")
        sha = git_sha()
        if self.state.get("git_sha") and sha and self.state["git_sha"] != sha:
            diffs.append(f"code {self.state['git_sha'][:10]} → {sha[:10]}")
        if self.state.get("config") != to_dict(self.resolved):
            diffs.append("config.yaml changed since the state was saved")
        if diffs and not self.opts.force:
            raise CTTAError(f"refusing to resume {run_dir}: {'; '.join(diffs)} (use --force to resume anyway)")

    # -- main -----------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        suite = self.suite
        from .data import open_dataset

        dataset = open_dataset(suite.dataset, suite.preprocess)
        from .data.domains import resolve_domains

        domains = resolve_domains(suite.domains, dataset.standard_domains)
        dataset.check(domains, suite.severities if suite.setting != "gradual" else [1, 2, 3, 4, 5])
        segments = build_stream(suite, dataset, self.opts.seed)

        if self.state is None:
            write_yaml(self.run_dir / "config.yaml", self.resolved)
            self._save_indices(segments)
        self.manifest = self._manifest_start()
        write_json(self.run_dir / "manifest.json", self.manifest)

        try:
            method, loaded = self._build_method(dataset)
            self.manifest.update(model=loaded.description, params=method.parameter_counts())
            for note in method.notes:
                self.reporter.note(note)
            status = self._loop(method, dataset, segments)
        except Interrupted:
            self._finish("interrupted")
            raise
        except DivergedError as e:
            self._finish("diverged", error=str(e))
            raise
        except CTTAError as e:
            self._finish("failed", error=str(e))
            raise
        except BaseException as e:
            self._finish("failed", error=f"{type(e).__name__}: {e}")
            raise
        summary = self._finish(status)
        return RunResult(self.run_dir, self.rows, summary, status)

    def _save_indices(self, segments: list[Segment]) -> None:
        import io

        from .results import atomic_write_bytes

        arrays = {}
        for s in segments:
            arrays[f"seg{s.index:04d}"] = s.indices
            for j, (d, sev, idx) in enumerate(s.parts):
                arrays[f"seg{s.index:04d}_part{j}_{d}"] = idx
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(self.run_dir / "indices.npz", buf.getvalue())

    def _manifest_start(self) -> dict:
        m = {
            "run_id": self.run_id, "suite": self.suite.name, "method": self.method_name,
            "seed": self.opts.seed, "status": "running",
            "created": (self.state or {}).get("created", now()), "finished": None,
            "versions": versions(), "git_sha": git_sha(), "host": host(), "device": str(self.device),
            "setting": self.suite.setting, "normalize": self.suite.preprocess.normalize,
            "model": None, "summary": None, "params": None, "resumed": self.state is not None,
        }
        if self.state is not None:
            m["resumes"] = int(self.state.get("resumes", 0)) + 1
        return m

    def _build_method(self, dataset):
        from .models.load import load_model

        seed_everything(self.opts.seed)
        loaded = load_model(self.suite.model, self.suite.preprocess, self.suite.dataset.classes, dataset)
        model = loaded.model.to(self.device)
        if self.opts.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.opts.compile:
            if self.device.type == "cuda":
                inner = model.model  # compile the network's forward; parameter names stay unchanged
                inner.forward = torch.compile(inner.forward)
            else:
                self.reporter.note(f"--compile is a GPU path: running eagerly on {self.device}")
        cls = registry.get(self.method_name)
        method = cls(model, self.cfg).to(self.device)
        return method, loaded

    def _loop(self, method, dataset, segments: list[Segment]) -> str:
        suite, dev = self.suite, self.device
        start_seg, start_batch, partial = 0, 0, None
        if self.state is not None:
            method.load_state_dict({**method._initial_state, **self.state["method"]})
            method.after_load()
            set_rng_state(self.state["rng"])
            start_seg, start_batch = self.state["segment"], self.state["batch"]
            partial = self.state.get("partial")
            self.rows = list(self.state["rows"])
            self.batch_rows = list(self.state["batch_rows"])
            self.source_rows = list(self.state.get("source_rows", []))
            self.resets = int(self.state.get("resets", 0))
        bs = suite.batch_size
        flag = _StopFlag()
        meter = PeakMemory(dev)
        amp = self._amp_context()
        first = True
        with _catch_signals(flag):
            for seg in segments[start_seg:]:
                first_batch = start_batch if seg.index == start_seg else 0
                if first_batch == 0 and seg.reset_before and seg.index > 0:
                    method.reset()
                data = open_segment(dataset, seg)
                total = len(data)
                n_dom = len(seg.domains)
                # per-segment accumulators live on the device: no host sync per batch
                if partial is not None and seg.index == start_seg:
                    errs = torch.as_tensor(partial["errs"], device=dev)
                    counts = torch.as_tensor(partial["counts"], device=dev)
                    batch_errs = [torch.as_tensor(partial["batch_errs"], device=dev)] if len(partial["batch_errs"]) else []
                    batch_ns = list(partial["batch_ns"])
                    seconds0 = float(partial["seconds"])
                else:
                    errs = torch.zeros(n_dom, dtype=torch.int64, device=dev)
                    counts = torch.zeros(n_dom, dtype=torch.int64, device=dev)
                    batch_errs, batch_ns, seconds0 = [], [], 0.0
                done = first_batch * bs
                bad_at = torch.full((), -1, dtype=torch.int64, device=dev)
                self.reporter.start_segment(seg, total, done)
                meter.reset()
                synchronize(dev)
                t0 = time.perf_counter()
                last_ui = t0
                b = first_batch
                for batch in data.batches(bs, start=first_batch * bs):
                    batch = batch.to(dev, non_blocking=suite.dataset.pin_memory)
                    x = batch.x
                    if self.opts.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    if first:
                        logits = self._first_forward(method, x, amp)
                        first = False
                    else:
                        with amp:
                            logits = method(x)
                    # first batch whose loss/logits were non-finite, tracked on device (no sync)
                    bad_at = torch.where((bad_at < 0) & ~method.finite.to(dev), b, bad_at)
                    wrong = logits.argmax(1) != batch.y
                    if batch.domain is None:
                        errs[0] += wrong.sum()
                        counts[0] += wrong.numel()
                    else:
                        # scatter_add keeps the output size static (bincount would sync on CUDA)
                        errs.scatter_add_(0, batch.domain, wrong.long())
                        counts.scatter_add_(0, batch.domain, torch.ones_like(batch.domain))
                    batch_errs.append(wrong.sum().reshape(1))
                    batch_ns.append(int(wrong.numel()))
                    done += int(wrong.numel())
                    b += 1
                    if suite.reset_every and b % suite.reset_every == 0:
                        method.reset()
                    now_t = time.perf_counter()
                    if now_t - last_ui > 0.5:  # throttled host sync for the progress bar
                        last_ui = now_t
                        self._check_finite(method, seg, bad_at)
                        self.reporter.update(done, int(errs.sum()), done / max(now_t - t0 + 1e-9, 1e-9))
                    if flag.signum is not None or (suite.checkpoint_every and b % suite.checkpoint_every == 0
                                                   and done < total):
                        self._save_state(method, seg.index, b, {
                            "errs": errs.cpu(), "counts": counts.cpu(),
                            "batch_errs": torch.cat(batch_errs).cpu() if batch_errs else [],
                            "batch_ns": batch_ns, "seconds": seconds0 + time.perf_counter() - t0,
                        })
                        if flag.signum is not None:
                            raise Interrupted(
                                f"interrupted by signal {flag.signum} during {seg.domain} (batch {b}); "
                                f"resume with: ctta-bench run --resume {self.run_dir}"
                            )
                synchronize(dev)
                seconds = seconds0 + time.perf_counter() - t0
                self._check_finite(method, seg, bad_at)
                per_batch = torch.cat(batch_errs).cpu().tolist() if batch_errs else []
                errs_l, counts_l = errs.cpu().tolist(), counts.cpu().tolist()
                n_seg = sum(counts_l)
                peak = meter.peak_mb()
                for j, name in enumerate(seg.domains):
                    n, e = counts_l[j], errs_l[j]
                    row = {"index": seg.index, "round": seg.round, "domain": name, "severity": seg.severity,
                           "n": n, "errors": e, "error": 100.0 * e / max(n, 1), "seconds": seconds,
                           "img_per_s": n_seg / max(seconds, 1e-9), "peak_mem_mb": peak}
                    self.rows.append(row)
                    self.reporter.end_segment(row)
                if suite.trace_batches:
                    for k, (e, n) in enumerate(zip(per_batch, batch_ns)):
                        self.batch_rows.append({"index": seg.index, "round": seg.round, "domain": seg.domain,
                                                "severity": seg.severity, "batch": k, "n": n, "errors": e})
                if suite.source_eval:
                    self.source_rows.append(self._source_eval(method, dataset, seg))
                self._write_tables()
                self._save_state(method, seg.index + 1, 0, None)
        return "complete"

    def _first_forward(self, method, x, amp):
        """The first batch, with model/input mismatches turned into one clear line."""
        try:
            with amp:
                return method(x)
        except (RuntimeError, AssertionError, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CTTAError(
                f"the model cannot process the input batch of shape {tuple(x.shape)} ({msg}); "
                "check preprocess.resize/crop against the model's input size"
            ) from None

    def _amp_context(self):
        from contextlib import nullcontext

        if not self.opts.amp:
            return nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.opts.amp)
        if dtype is None:
            raise CTTAError(f"--amp must be bf16 or fp16, got {self.opts.amp}")
        if self.device.type != "cuda":
            self.reporter.note(f"--amp {self.opts.amp} is a GPU path: running in float32 on {self.device}")
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _check_finite(self, method, seg: Segment, bad_at: torch.Tensor) -> None:
        """Checked at the throttled progress syncs and at each domain end (no per-batch sync)."""
        if bool(method.finite):
            return
        where = f"{seg.domain} (severity {seg.severity}, round {seg.round}) at batch {int(bad_at)}"
        if self.suite.on_divergence == "reset":
            self.resets += 1
            self.reporter.note(f"non-finite loss/logits in {where}: method reset (reset #{self.resets})")
            method.reset()
            method.finite = torch.ones((), dtype=torch.bool)
            return
        self._write_tables()
        raise DivergedError(
            f"adaptation diverged: non-finite loss/logits in {where}; rows so far are kept "
            f"(set on_divergence=reset to reset and continue)"
        )

    @torch.no_grad()
    def _source_eval(self, method, dataset, seg: Segment) -> dict:
        """Error of the adapted model on the clean source test set, without adapting on it."""
        data = dataset.source_test()
        if data is None:
            raise CTTAError("source_eval needs the clean source test set: set dataset.source_root")
        model = getattr(method, "eval_model", None) or method.model
        was = model.training
        model.eval()
        errors = n = 0
        e_dev = torch.zeros((), dtype=torch.int64, device=self.device)
        for batch in data.batches(self.suite.batch_size):
            batch = batch.to(self.device)
            e_dev += (model(batch.x).argmax(1) != batch.y).sum()
            n += len(batch.y)
        errors = int(e_dev)
        model.train(was)
        return {"after_index": seg.index, "round": seg.round, "domain": seg.domain, "n": n,
                "errors": errors, "error": 100.0 * errors / max(n, 1)}

    def _write_tables(self) -> None:
        write_csv(self.run_dir / "domains.csv", self.rows, DOMAIN_COLUMNS)
        if self.suite.trace_batches:
            write_csv(self.run_dir / "batches.csv", self.batch_rows, BATCH_COLUMNS)
        if self.suite.source_eval:
            write_csv(self.run_dir / "source_eval.csv", self.source_rows, SOURCE_EVAL_COLUMNS)

    def _save_state(self, method, segment: int, batch: int, partial: dict | None) -> None:
        if not self.suite.save_state:
            return
        from . import __version__

        (self.run_dir / "state").mkdir(exist_ok=True)
        atomic_torch_save(self.run_dir / "state" / "latest.pt", {
            "version": STATE_VERSION, "ctta_bench": __version__, "git_sha": self.manifest.get("git_sha"),
            "config": to_dict(self.resolved), "created": self.manifest.get("created"),
            "resumes": self.manifest.get("resumes", 0),
            "segment": segment, "batch": batch, "partial": partial,
            "method": changed_state(method), "rng": rng_state(),
            "rows": self.rows, "batch_rows": self.batch_rows, "source_rows": self.source_rows,
            "resets": self.resets,
        })

    def _finish(self, status: str, error: str | None = None) -> dict:
        summary = summarize(self.rows)
        if self.resets:
            summary["divergence_resets"] = self.resets
        self.manifest.update(status=status, finished=now(), summary=summary)
        if error:
            self.manifest["error"] = error
        try:
            write_json(self.run_dir / "manifest.json", self.manifest)
        except CTTAError:
            pass  # the original error matters more; earlier files are intact
        return summary


def changed_state(method) -> dict:
    """The entries of ``method.state_dict()`` that differ from its t=0 snapshot, on CPU.

    Frozen parts (CoTTA's anchor, a frozen backbone under Tent/VPT) are rebuilt identically when
    the run is resumed, so a checkpoint holds only what adaptation changed.
    """
    init = method._initial_state or {}
    out = {}
    for k, v in method.state_dict().items():
        if torch.is_tensor(v):
            v = v.detach().to("cpu")
            ref = init.get(k)
            if torch.is_tensor(ref) and ref.shape == v.shape and ref.dtype == v.dtype and torch.equal(ref, v):
                continue
        out[k] = v
    return out


def summarize(rows: list[dict]) -> dict:
    """mean of per-domain errors (the papers' 'mean' column) and the error over all samples."""
    if not rows:
        return {"mean_error": None, "error_all": None, "n": 0}
    n = sum(r["n"] for r in rows)
    e = sum(r["errors"] for r in rows)
    out = {"mean_error": float(np.mean([r["error"] for r in rows])), "error_all": 100.0 * e / max(n, 1),
           "n": int(n)}
    if len({r["severity"] for r in rows}) > 1:  # gradual / multi-severity: also the usual "error at 5"
        at5 = [r["error"] for r in rows if r["severity"] == 5]
        out["mean_error_at_5"] = float(np.mean(at5)) if at5 else None
    return out


def run(opts: RunOptions, reporter: Reporter | None = None) -> RunResult:
    """Run (or resume) one method on one suite and write its results folder."""
    return Run(opts, reporter).execute()
