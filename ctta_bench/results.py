"""The results store: one folder per run, tidy tables, every file written atomically.

    results/<suite>/<method>/<run-id>/
        config.yaml    resolved config (suite + method hyperparameters + run options)
        manifest.json  versions, git sha, host, device, seed, status, timings, summary
        domains.csv    one row per (round, domain, severity) segment
        batches.csv    per-batch errors (optional)
        indices.npz    the sample index list of every segment (the exact stream)
        state/         resume checkpoints

A file is written to a temporary name in the same folder and renamed over the target, so a
killed run never leaves a half-written table that looks complete.
"""
from __future__ import annotations

import datetime as _dt
import functools
import io
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import CTTAError

DOMAIN_COLUMNS = ["index", "round", "domain", "severity", "n", "errors", "error", "seconds",
                  "img_per_s", "peak_mem_mb"]
BATCH_COLUMNS = ["index", "round", "domain", "severity", "batch", "n", "errors"]
SOURCE_EVAL_COLUMNS = ["after_index", "round", "domain", "n", "errors", "error"]


@functools.lru_cache(maxsize=None)
def _file_mode() -> int:
    """0o666 minus the process umask: what ``open()`` would give (mkstemp makes 0o600 files,
    which colleagues on a shared cluster could not read)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """``write(f)`` into a temporary file beside ``path``, fsync, rename over ``path``; an OSError
    (disk full, permissions) is a CTTAError and leaves the earlier file intact."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CTTAError(f"cannot write results to {path.parent}: {e.strerror}") from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        reason = "the disk is full" if e.errno == 28 else e.strerror
        raise CTTAError(f"could not write {path}: {reason}; files written before are intact") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), "wb")


def atomic_torch_save(path: Path, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """A CSV table with a fixed column order (no pandas needed to write)."""
    import csv

    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k)) for k in columns})
    atomic_write_text(path, out.getvalue())


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.10g}"
    return v


def write_yaml(path: Path, data: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id(seed: int) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-s{seed}-{secrets.token_hex(2)}"


def make_run_dir(out: Path, suite: str, method: str, run_id: str) -> Path:
    """Create ``out/<suite>/<method>/<run_id>``; an unwritable root is a clear CTTAError."""
    out = Path(out)
    path = out / suite / method / run_id
    try:
        path.mkdir(parents=True, exist_ok=False)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except FileExistsError:
        raise CTTAError(f"run folder {path} already exists") from None
    except OSError as e:
        raise CTTAError(f"output directory {out} is not writable ({e.strerror}); choose another with --out") from None
    return path


def git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except Exception:
        return None


def versions() -> dict[str, str]:
    import torch

    from . import __version__

    out = {"ctta_bench": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform()}
    for mod in ("timm", "numpy", "robustbench"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def host() -> str:
    return socket.gethostname()
