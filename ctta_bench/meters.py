"""Cost meters shared by runs and ``ctta-bench bench``: peak memory (CPU RSS, CUDA allocated)."""
from __future__ import annotations

import ctypes
import gc
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


class PeakMemory:
    """Peak memory since :meth:`reset`, in MiB.

    CPU: the process's peak resident set (Linux ``VmHWM``, which writing ``5`` to
    ``/proc/self/clear_refs`` resets; elsewhere the lifetime ``ru_maxrss``). CUDA: the
    allocator's ``max_memory_allocated`` on the device.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                _CLEAR_REFS.write_text("5")
            except OSError:
                pass

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return cpu_peak_rss_mb()


def _status_mb(key: str) -> Optional[float]:
    """A ``kB`` field of Linux ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MiB; None elsewhere."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 2**20 if sys.platform == "darwin" else ru / 1024


def current_mem_mb(device: torch.device) -> Optional[float]:
    """Memory in use now: CUDA allocated, or the process's resident set (Linux ``VmRSS``)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return _status_mb("VmRSS")


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def release_freed_memory(device: torch.device) -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    ``ctta-bench bench`` calls it between methods, so that one method's freed buffers do not
    hide the next one's memory growth. The runner does not: trimmed pages fault back in during
    the next domain's first batches, inside the timed loop (benchmarks/memory_scaling.py
    ``--trim`` measures what it would save).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
