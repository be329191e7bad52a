"""Peak memory of a run does not depend on how many images are streamed.

Every configuration runs ``ctta_bench.runner.run`` in a fresh child process (so no run inherits
another's heap) and reports the peak resident set while streaming: the largest per-domain
``peak_mem_mb`` of ``domains.csv`` (the runner resets the high-water mark at each domain start).
Because the resident set also depends on how glibc keeps freed memory (a few % of noise), it
also reports the bytes of all tensors reachable from Python after the last domain, which do not
depend on the allocator: these must be identical for N and 2N.

Experiments
-----------
* ``per-domain`` — images per domain N vs 2N, through a *streaming* dataset kind defined here
  (``synthetic-stream``: the digits target images cycled, with per-index seeded noise, generated
  batch by batch, so the loader itself holds O(batch) memory like a real -C loader over files).
  The embedded digits suite cannot show this: it has only 540 target images per domain and
  holds each domain in memory (7 MB) by design. Same source model as digits-c (the small CNN).
* ``stream-length`` — the real digits-c suite with ``rounds=1`` vs ``rounds=2`` (twice the
  batches through the same runner state: rows, batch trace, checkpoints).
* ``--trim`` — the same with freed heap pages handed back to the OS at each domain start
  (``ctta_bench.meters.release_freed_memory``: gc + glibc ``malloc_trim``). Without it glibc
  keeps freed blocks of the per-domain data (corruption temporaries, evicted cache entries) and
  the resident set creeps up a little from domain to domain, although nothing the harness holds
  grows (the live-tensor column). The runner does *not* trim: the trimmed pages fault back in
  during the next domain's first batches, a cost inside the timed loop, for a few % of RSS.
* ``leak control`` — the per-domain experiment with a Tent whose forward keeps every input
  batch: shows that the measurement does detect memory that grows with the stream.

Usage (numbers in docs/performance.md)::

    python benchmarks/memory_scaling.py --n 1000 --threads 1
    python benchmarks/memory_scaling.py --n 1000 --threads 1 --trim
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

#: images per domain of the synthetic stream (set by the child's --n)
DOMAIN_SIZE = 1000


class StreamedDomain:
    """N images generated on the fly: digits target image ``i mod 540`` plus noise seeded by ``i``."""

    def __init__(self, indices, sigma: float, domain_seed: int):
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.sigma, self.domain_seed = sigma, domain_seed

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int, start: int = 0):
        from ctta_bench.data.base import Batch
        from ctta_bench.data.digits import split

        base_x, base_y = split("target")
        for i in range(start, len(self.indices), batch_size):
            ids = self.indices[i : i + batch_size]
            g = torch.Generator().manual_seed(self.domain_seed * 1_000_003 + i)
            x = base_x[ids % len(base_y)]
            x = (x + self.sigma * torch.randn(x.shape, generator=g)).clamp_(0.0, 1.0)
            yield Batch(x, base_y[ids % len(base_y)])


class SyntheticStream:
    """Dataset kind ``synthetic-stream`` (this benchmark only): three noise levels as domains."""

    standard_domains = ["noise_0.1", "noise_0.2", "noise_0.3"]

    def __init__(self, spec, preprocess):
        self.size = 32

    def check(self, domains, severities) -> None:
        pass

    def domain_size(self, domain: str, severity: int) -> int:
        return DOMAIN_SIZE

    def labels(self, domain: str, severity: int):
        from ctta_bench.data.digits import split

        y = split("target")[1].numpy()
        return y[[i % len(y) for i in range(DOMAIN_SIZE)]]

    def open(self, domain: str, severity: int, indices) -> StreamedDomain:
        return StreamedDomain(indices, float(domain.split("_")[1]), self.standard_domains.index(domain))

    def source_test(self):
        return None

    def source_train(self):
        from ctta_bench.data.digits import split

        return split("train", self.size)


def live_tensor_mb() -> float:
    """Bytes of every tensor storage reachable from Python objects (deduplicated): what the
    process holds on purpose, independent of how the allocator keeps freed memory."""
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            try:
                st = obj.untyped_storage()
                key = (st.data_ptr(), st.nbytes())
            except (RuntimeError, NotImplementedError):
                continue
            if key not in seen:
                seen.add(key)
                total += key[1]
    return total / 2**20


def child(args) -> None:
    """One run in this process; prints one JSON line."""
    global DOMAIN_SIZE
    if args.threads:
        torch.set_num_threads(args.threads)
    from ctta_bench import _compat

    _compat.ensure_torchvision_importable()
    from ctta_bench import data, registry
    from ctta_bench.meters import cpu_peak_rss_mb
    from ctta_bench.runner import RunOptions, run

    if args.trim:  # experiment: hand freed heap pages back at each domain start
        from ctta_bench import meters

        reset = meters.PeakMemory.reset

        def trimmed_reset(self):
            meters.release_freed_memory(self.device)
            reset(self)

        meters.PeakMemory.reset = trimmed_reset
    overrides = [f"rounds={args.rounds}"]
    if args.child == "synthetic":
        DOMAIN_SIZE = args.n
        data.DATASETS["synthetic-stream"] = "__main__:SyntheticStream"
        overrides += ["dataset.kind=synthetic-stream", "severities=[1]"]
    if args.leak:  # control: a Tent that keeps a reference to every batch it sees
        cls = registry.get(args.method)
        kept = []
        forward = cls.forward

        def leaky(self, x):
            kept.append(x)
            return forward(self, x)

        cls.forward = leaky
    from ctta_bench import runner

    live = []
    write_tables = runner.Run._write_tables

    def measured_write_tables(self):  # called once after every domain
        live.append(live_tensor_mb())
        write_tables(self)

    runner.Run._write_tables = measured_write_tables
    res = run(RunOptions(suite="digits-c", method=args.method, seed=0, device="cpu", out=Path(args.out),
                         overrides=overrides))
    print(json.dumps({"images": sum(r["n"] for r in res.rows), "domains": len(res.rows),
                      "peak_mb": max(r["peak_mem_mb"] for r in res.rows),
                      "first_domain_peak_mb": res.rows[0]["peak_mem_mb"],
                      "live_tensor_mb_first": live[0], "live_tensor_mb_last": live[-1],
                      "rss_end_mb": cpu_peak_rss_mb()}))


def spawn(kind: str, method: str, n: int, rounds: int, leak: bool, threads, trim: bool, tmp: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--method", method, "--n", str(n),
           "--rounds", str(rounds), "--out", tmp]
    if leak:
        cmd.append("--leak")
    if trim:
        cmd.append("--trim")
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"child failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="source,tent")
    ap.add_argument("--n", type=int, default=1000, help="images per domain of the smaller synthetic run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-control", action="store_true", help="skip the leaky-Tent control")
    ap.add_argument("--trim", action="store_true",
                    help="experiment: gc + malloc_trim before each domain's peak-memory reset")
    ap.add_argument("--out", type=Path, default=None, help="write the measurements as JSON")
    ap.add_argument("--child", choices=["synthetic", "digits"], help=argparse.SUPPRESS)
    ap.add_argument("--method", default="tent", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--leak", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0

    plan = []
    for m in args.methods.split(","):
        plan.append(("per-domain", "synthetic", m, False, [(args.n, 1), (2 * args.n, 1)]))
        plan.append(("stream-length", "digits", m, False, [(540, 1), (540, 2)]))
    if not args.no_control:
        plan.append(("leak control", "synthetic", "tent", True, [(args.n, 1), (2 * args.n, 1)]))
    results = []
    print(f"{'experiment':<15}{'method':<24}{'images':>16}{'peak RSS MB':>22}{'growth':>9}"
          f"{'live tensors MB at the end':>30}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, method, leak, sizes in plan:
            a, b = (spawn(kind, method, n, r, leak, args.threads, args.trim, tmp) for n, r in sizes)
            growth = b["peak_mb"] / a["peak_mb"] - 1
            results.append({"experiment": name, "method": method, "small": a, "large": b, "growth": growth})
            label = method + (" (keeps batches)" if leak else "")
            print(f"{name:<15}{label:<24}{a['images']:>7} → {b['images']:>6}{a['peak_mb']:>10.1f} → {b['peak_mb']:>8.1f}"
                  f"{100 * growth:>8.1f}%{a['live_tensor_mb_last']:>18.1f} → {b['live_tensor_mb_last']:>7.1f}",
                  flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    # the target: 2x the images per domain, < 5 % more peak RSS; a longer stream (more domains)
    # must hold no more live tensors (its RSS may creep by the allocator's fragmentation)
    per_domain = all(r["growth"] < 0.05 for r in results if r["experiment"] == "per-domain")
    no_leak = all(abs(r["large"]["live_tensor_mb_last"] - r["small"]["live_tensor_mb_last"]) < 1.0
                  for r in results if r["experiment"] == "stream-length")
    print("per-domain: peak RSS grows < 5 % when a domain doubles" if per_domain
          else "per-domain: peak RSS grows >= 5 % when a domain doubles: see above")
    print("stream-length: the same live tensors after 2x the domains" if no_leak
          else "stream-length: live tensors grow with the number of domains: see above")
    ok = per_domain and no_leak
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
