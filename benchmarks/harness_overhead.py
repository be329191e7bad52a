"""Harness overhead: the runner's timed loop vs a bare PyTorch loop doing the same work.

For each method (default: source and tent) and each repeat, this script

1. runs the real runner in process, ``ctta_bench.runner.run(RunOptions(...))`` on the digits-c
   suite (small BN-CNN), and reads each domain's ``seconds`` (the timed batch loop: from the
   first batch to the last logits, including scoring, finiteness tracking and the throttled
   progress syncs; excluding model loading, data corruption and the domain-boundary writes);
2. runs a bare loop over the *same* batch tensors (the stream the runner used, materialised
   before timing) on the *same* source model: for tent, forward → entropy → backward → Adam
   step → zero_grad written out by hand; for source, a no-grad forward; both count errors on
   the device, as any evaluation loop must.

The runner's and the bare loop's error counts must match exactly (same work), and the ratio
of their loop times is the harness overhead. Because that ratio is within the noise of a shared
CPU, the script also measures the harness's own cost directly: the runner's loop with a
registered no-op method (fixed logits), divided by the bare loop's time per batch. Runner and
bare loop alternate order every repeat; a first, discarded round warms the process (kernels,
allocator). Three estimators of the end-to-end ratio are printed: the median of the paired
ratios, the ratio of the fastest repeats, and the ratio of the per-domain minima over the
repeats summed over the domains (the most robust to the load spikes of a shared CPU). The
runner drives the CLI's rich progress bar (``--reporter none`` to leave it out). The
domain-boundary costs (``_write_tables`` + ``_save_state``, outside the timed loop) are
reported separately.

Usage (numbers in docs/performance.md)::

    python benchmarks/harness_overhead.py --repeats 5 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def runner_once(method: str, overrides: list[str], seed: int, out: Path, reporter: str = "rich") -> dict:
    """One in-process ``ctta-bench run``: per-domain loop seconds and errors, boundary seconds.

    ``reporter="rich"`` drives the CLI's progress bar (rendered to an in-memory terminal), so its
    cost is part of the measurement as in a real ``ctta-bench run``.
    """
    import contextlib
    import io

    from ctta_bench import runner

    spent = {"boundary": 0.0}
    originals = {n: getattr(runner.Run, n) for n in ("_write_tables", "_save_state")}

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent["boundary"] += time.perf_counter() - t
        return wrapper

    for n, fn in originals.items():
        setattr(runner.Run, n, timed(fn))
    try:
        if reporter == "rich":
            from rich.console import Console

            from ctta_bench.cli_run import RichReporter

            rep = RichReporter(Console(file=io.StringIO(), force_terminal=True, width=120))
        else:
            rep = contextlib.nullcontext(None)
        t0 = time.perf_counter()
        with rep as r:
            res = runner.run(runner.RunOptions(suite="digits-c", method=method, seed=seed, device="cpu",
                                               out=out, overrides=overrides), r)
        wall = time.perf_counter() - t0
    finally:
        for n, fn in originals.items():
            setattr(runner.Run, n, fn)
    return {"seconds": [r["seconds"] for r in res.rows], "errors": [r["errors"] for r in res.rows],
            "boundary": spent["boundary"], "wall": wall}


def null_method_class():
    """A registered method that does no work (returns fixed logits): the runner's loop time with it
    is the harness's own per-batch cost (batch move, scoring, finiteness tracking, progress)."""
    from dataclasses import dataclass

    from ctta_bench import registry
    from ctta_bench.method import Method

    if "_null-bench" in registry.methods():
        return registry.get("_null-bench")

    @dataclass
    class NullConfig:
        """No hyperparameters."""

    class NullMethod(Method):
        name = "_null-bench"
        Config = NullConfig

        def __init__(self, model, cfg=None):
            super().__init__(model, cfg)
            self.register_buffer("logits", torch.zeros(4096, 10), persistent=False)

        def forward(self, x):
            out = self.logits[: x.shape[0]]
            self.mark_finite(out)
            return out

    return registry.register(NullMethod)


def stream_batches(overrides: list[str], seed: int):
    """The runner's stream for these overrides, as lists of (x, y) per domain, plus suite and dataset."""
    from ctta_bench.data import open_dataset
    from ctta_bench.runner import RunOptions, resolve_config
    from ctta_bench.stream import build_stream, open_segment

    suite, _, _, _ = resolve_config(RunOptions(suite="digits-c", overrides=overrides))
    dataset = open_dataset(suite.dataset, suite.preprocess)
    domains = []
    for seg in build_stream(suite, dataset, seed):
        domains.append([(b.x, b.y) for b in open_segment(dataset, seg).batches(suite.batch_size)])
    return suite, dataset, domains


def bare_once(method: str, suite, dataset, domains, seed: int, lr: float) -> dict:
    """The same adaptation written as a plain PyTorch loop on the same source model."""
    from ctta_bench.models.load import load_model
    from ctta_bench.runner import seed_everything

    seed_everything(seed)
    model = load_model(suite.model, suite.preprocess, suite.dataset.classes, dataset).model
    if method == "tent":  # Tent's configure_model / collect_params, by hand
        model.train()
        model.requires_grad_(False)
        params = []
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
                params += [m.weight, m.bias]
        opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    else:
        model.eval()
        model.requires_grad_(False)
    seconds, errors = [], []
    for batches in domains:
        errs = torch.zeros((), dtype=torch.int64)
        t0 = time.perf_counter()
        for x, y in batches:
            if method == "tent":
                logits = model(x)
                loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean(0)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    logits = model(x)
            errs += (logits.argmax(1) != y).sum()
        seconds.append(time.perf_counter() - t0)
        errors.append(int(errs))
    return {"seconds": seconds, "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="source,tent")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 = steadier on a busy machine)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="suite override, as `ctta-bench run --set` (e.g. domains=[gaussian_noise,fog])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reporter", choices=["rich", "none"], default="rich",
                    help="the CLI's rich progress bar (default, as `ctta-bench run`) or none")
    ap.add_argument("--out", type=Path, default=None, help="write the raw measurements as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ctta_bench import _compat

    _compat.ensure_torchvision_importable()
    methods = [m for m in args.methods.split(",") if m]
    if set(methods) - {"source", "tent"}:
        ap.error("the bare loop is written for source and tent only")
    suite, dataset, domains = stream_batches(args.overrides, args.seed)
    lr = float((suite.methods.get("tent") or {}).get("lr", 1e-3))
    n_images = sum(len(y) for batches in domains for _, y in batches)
    print(f"digits-c: {len(domains)} domains, {n_images} images, batch {suite.batch_size}, "
          f"torch threads {torch.get_num_threads()}", flush=True)

    raw = {m: {"runner": [], "bare": []} for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats + 1):  # round 0 warms the process and is discarded
            for m in methods:
                order = ("runner", "bare") if rep % 2 else ("bare", "runner")
                got = {}
                for kind in order:
                    if kind == "runner":
                        got[kind] = runner_once(m, args.overrides, args.seed, Path(tmp) / f"r{rep}", args.reporter)
                    else:
                        got[kind] = bare_once(m, suite, dataset, domains, args.seed, lr)
                if got["runner"]["errors"] != got["bare"]["errors"]:
                    print(f"ERROR: {m}: runner errors {got['runner']['errors']} != bare {got['bare']['errors']}")
                    return 1
                if rep:
                    for kind in order:
                        raw[m][kind].append(got[kind])
                r, b = sum(got["runner"]["seconds"]), sum(got["bare"]["seconds"])
                print(f"{'warm-up' if not rep else f'repeat {rep}'}: {m:<6} runner loop {r:7.3f} s  "
                      f"bare {b:7.3f} s  ratio {r / b:6.3f}", flush=True)

    # the harness's own cost per batch: the runner's loop with a method that does nothing
    null = null_method_class()
    with tempfile.TemporaryDirectory() as tmp:
        null_runs = [runner_once(null.name, args.overrides, args.seed, Path(tmp) / f"n{i}", args.reporter)
                     for i in range(args.repeats)]
    n_batches = sum(len(b) for b in domains)
    null_ms = 1e3 * statistics.median(sum(x["seconds"]) for x in null_runs) / n_batches

    print()
    print(f"harness cost per batch (runner loop with a no-op method): {null_ms:.3f} ms")
    print(f"{'method':<8}{'runner loop s':>14}{'bare loop s':>13}{'overhead (median of paired ratios)':>36}"
          f"{'overhead (min/min)':>20}{'overhead (per-domain min)':>27}{'boundary s/domain':>19}{'run() wall s':>14}")
    summary = {"_harness_ms_per_batch": null_ms}
    for m in methods:
        rl = [sum(x["seconds"]) for x in raw[m]["runner"]]
        bl = [sum(x["seconds"]) for x in raw[m]["bare"]]
        paired = statistics.median(r / b for r, b in zip(rl, bl))
        best = min(rl) / min(bl)
        # robust to the spikes of a shared CPU: each domain's fastest loop over the repeats, summed
        dmin = (sum(min(x["seconds"][i] for x in raw[m]["runner"]) for i in range(len(domains)))
                / sum(min(x["seconds"][i] for x in raw[m]["bare"]) for i in range(len(domains))))
        boundary = statistics.median(x["boundary"] for x in raw[m]["runner"]) / len(domains)
        wall = statistics.median(x["wall"] for x in raw[m]["runner"])
        bare_ms = 1e3 * statistics.median(bl) / n_batches
        summary[m] = {"runner_loop_s": statistics.median(rl), "bare_loop_s": statistics.median(bl),
                      "harness_ms_per_batch": null_ms, "bare_ms_per_batch": bare_ms,
                      "overhead_from_null": null_ms / bare_ms,
                      "overhead_paired_median": paired - 1, "overhead_min_over_min": best - 1,
                      "overhead_per_domain_min": dmin - 1,
                      "boundary_s_per_domain": boundary, "run_wall_s": wall}
        print(f"{m:<8}{statistics.median(rl):>14.3f}{statistics.median(bl):>13.3f}{100 * (paired - 1):>35.1f}%"
              f"{100 * (best - 1):>19.1f}%{100 * (dmin - 1):>26.1f}%{boundary:>19.4f}{wall:>14.2f}")
        print(f"{'':<8}no-op harness cost / bare batch time = {null_ms:.3f} / {bare_ms:.2f} ms "
              f"= {100 * null_ms / bare_ms:.2f} %")
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "raw": raw, "threads": torch.get_num_threads(),
                                        "images": n_images}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
