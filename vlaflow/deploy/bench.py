"""Per-control-step latency (p50/p99), network evaluations per step, and the closed-loop PushT score of each
sampling variant, in PyTorch eager and in ONNX Runtime: :func:`bench_latency` over a :class:`LatencyBench`
(the ``vlaflow bench latency CKPT`` command, in :mod:`vlaflow.cli.bench`).

    vlaflow bench latency CKPT [--onnx DIR] [--variants ddpm:100,ddim:10] [--episodes 50] [--workers 2]
                               [--repeats 50] [--threads 1] [--json] [--out DIR]

Variants: DDPM-100 and DDIM-10 for diffusion checkpoints, Euler-10 for flow checkpoints (``--variants`` to
choose), plus RTI (``--rti``: ``RTIConfig``'s defaults, eager and ONNX Runtime), one-step consistency
students (``--onestep CKPT[,CKPT]``) and EBT (``--ebt CKPT``). A control step is one ``infer(obs)`` call:
normalize, encode once, the whole sampler loop, un-normalize (what the executor waits for every Ta steps).
Both runtimes run single-threaded (``torch.set_num_threads(threads)``; onnxruntime
``intra_op_num_threads=threads``, graph optimization ALL) so the comparison is fair on a shared machine; the
per-denoiser-step latency of each runtime (one ``predict`` at batch 1) is reported beside the rows, with the
load average before and after the timing.

Writes OUT/latency.json (rows + machine info), OUT/latency.md and OUT/latency_hist.png; ``--json`` prints
the rows (variant, runtime, nfe, p50_ms, p99_ms, mean_score, ...) as one JSON line.

The score is not computed here: deploy/ sits below sim/, so the caller passes a ``score`` callable (the CLI
builds it on :func:`vlaflow.sim.evaluate.evaluate`); without one, rows are timed only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlaflow.deploy.rti_config import RTIConfig
from vlaflow.errors import ConfigError

RUNTIMES = ("torch-eager", "onnxruntime")
SAMPLERS = ("ddpm", "ddim", "euler", "heun")

# score(factory, episodes, workers, max_steps, **realtime) -> {"mean_score", "success_rate", "episodes"}:
# the closed-loop PushT score of a zero-argument runtime factory; ``realtime`` (merge=, exec_horizon=) asks
# for the real-time executor (RTI replanning every s control steps) instead of plain chunking. The CLI
# builds it on vlaflow.sim.evaluate; deploy/ never imports the simulator.
ScoreFn = Callable[..., dict]


def rti_label(rti: RTIConfig, exec_horizon: int, spec_ta: int) -> tuple[str, dict | None]:
    """The RTI row's name and the real-time settings its score needs (None: plain chunking, s = Ta).

    ``RTI`` is RTIConfig's defaults scored with plain chunking (the table's row since the first release);
    other settings are named, e.g. ``RTI 3 warm, every tick`` for RTI-DP's own regime (replan each control
    step from the previous chunk shifted by 1)."""
    parts = [] if rti.n_warm_steps == RTIConfig().n_warm_steps else [f"{rti.n_warm_steps} warm"]
    s = exec_horizon if exec_horizon and exec_horizon != spec_ta else 0
    if s:
        parts.append("every tick" if s == 1 else f"every {s} steps")
    label = "RTI" + (" " + ", ".join(parts) if parts else "")
    return label, ({"merge": "rti", "exec_horizon": s} if s else None)


@dataclass(frozen=True)
class LatencyBench:
    """What ``vlaflow bench latency`` measures (one field per flag; comma lists become tuples)."""

    checkpoint: str  # policy checkpoint directory (PushT low-dim)
    onnx: str | None = None  # an existing `vlaflow export` of checkpoint; None: export to a temporary dir
    variants: tuple[tuple[str, int], ...] = ()  # (sampler, steps) rows; (): default_variants(policy)
    runtimes: tuple[str, ...] = RUNTIMES  # which of RUNTIMES to time
    rti: bool = False  # add RTI-DP rows (RTIConfig's defaults, or the two fields below)
    rti_warm: int = 0  # RTI reverse steps after the warm start (0: RTIConfig's default)
    rti_exec_horizon: int = 0  # score RTI replanning every s control steps (1: every tick); 0: every Ta
    onestep: tuple[str, ...] = ()  # one-step consistency student checkpoints to add
    ebt: str | None = None  # an EBT checkpoint to add
    episodes: int = 50  # PushT episodes per scored row
    score_runtimes: tuple[str, ...] = RUNTIMES  # runtimes whose rows get a score
    score_only: tuple[str, ...] = ()  # "VARIANT/runtime" rows to score; (): all
    scores_from: tuple[str, ...] = ()  # earlier latency.json files whose scores are reused
    eager_reports: str | None = None  # DIR/<sampler><steps>/report.json: eager scores of an earlier eval
    workers: int = 2  # evaluation worker processes
    max_steps: int | None = None  # episode step limit (None: the task's)
    repeats: int = 50  # timed control steps per row
    step_repeats: int = 300  # timed single denoiser steps per runtime
    threads: int = 1  # torch and onnxruntime intra-op threads
    out: str | None = None  # directory for latency.json, latency.md, latency_hist.png (None: not written)

    def __post_init__(self) -> None:
        bad = [r for r in self.runtimes if r not in RUNTIMES]
        if bad or not self.runtimes:
            raise ConfigError(f"--runtimes must be a comma list of {RUNTIMES}, got {bad or self.runtimes}")
        if self.rti_warm < 0 or self.rti_exec_horizon < 0:
            raise ConfigError("--rti-warm and --rti-exec-horizon must be >= 0 (0: the defaults)")
        for name in ("episodes", "repeats", "step_repeats", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for sampler, steps in self.variants:
            if sampler not in SAMPLERS or steps < 1:
                raise ConfigError(
                    f"variants are (sampler, steps >= 1) with sampler in {SAMPLERS}, got {(sampler, steps)}"
                )


def _variant_name(sampler: str, steps: int) -> str:
    return f"{sampler.upper() if sampler in ('ddpm', 'ddim') else sampler.capitalize()}-{steps}"


def default_variants(policy) -> list[tuple[str, int]]:
    if policy.config.family == "diffusion":
        return [("ddpm", int(policy.path.num_train_steps)), ("ddim", 10)]
    if policy.config.family == "flow":
        return [("euler", 10)]
    return [(policy.config.sampler, int(policy.config.num_inference_steps))]


def _percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms, np.float64)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "n": int(a.size),
    }


def time_calls(fn, repeats: int, warmup: int = 3) -> list[float]:
    """Wall time of ``fn()`` in ms, ``repeats`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _machine() -> dict:
    from vlaflow.runinfo import git_commit, machine, package_versions, utc_now

    return {
        "command": " ".join(["vlaflow", *sys.argv[1:]]) if sys.argv else "",
        "when": utc_now(),
        "git_commit": git_commit(),
        **machine(),
        "versions": package_versions(("torch", "onnxruntime", "onnx", "numpy")),
    }


def _reuse_report(path: Path, episodes: int) -> dict | None:
    """The score of an earlier ``vlaflow eval`` of the same variant (e.g. the training benchmark's)."""
    if not path.is_file():
        return None
    rep = json.loads(path.read_text())
    a = rep["aggregate"]
    if rep.get("errors"):  # a row shows its own episode count
        return None
    seeds = [e["seed"] for e in rep["episodes"]]
    return {
        "mean_score": a["mean_score"],
        "success_rate": a["success_rate"],
        "episodes": a["n_episodes"],
        "score_source": f"{path} (seeds {min(seeds)}..{max(seeds)})",
    }


def _plot(rows: list[dict], samples: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    all_ms = [v for k in samples for v in samples[k]]
    bins = np.logspace(np.log10(max(min(all_ms) * 0.8, 1e-3)), np.log10(max(all_ms) * 1.2), 60)
    for r in rows:
        key = f"{r['variant']} / {r['runtime']}"
        ax.hist(
            samples[key], bins=bins, histtype="step", linewidth=1.5, label=f"{key} (p50 {r['p50_ms']:.1f} ms)"
        )
    ax.set_xscale("log")
    ax.set_xlabel("control-step latency, ms (log scale)")
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_markdown(result: dict) -> str:
    ps = result["per_denoiser_step"]
    lines = [
        "# Control-step latency"
        + (" and PushT score" if result.get("task") else "")
        + " per sampling variant",
        "",
        f"Checkpoint `{result['checkpoint']}`; command `{result['machine']['command']}`; "
        f"{result['machine']['when']}; threads {result['threads']} (torch.set_num_threads and ORT "
        f"intra_op_num_threads); load average before {result['loadavg_before']}, after "
        f"{result['loadavg_after']} on {result['machine']['cpu_count']} CPUs.",
        "",
        "| variant | runtime | NFE/step | p50 ms | p99 ms | mean score | success | episodes | score from |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        sc = "n/a" if r["mean_score"] is None else f"{r['mean_score']:.3f}"
        su = "n/a" if r.get("success_rate") is None else f"{r['success_rate']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['runtime']} | {r['nfe']:g} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {sc} | {su} | {r.get('episodes') or 0} | {r.get('score_source') or ''} |"
        )
    lines += [
        "",
        "Per denoiser step (one network evaluation, batch 1): "
        + ", ".join(f"{k} p50 {v['p50_ms']:.3f} ms (p99 {v['p99_ms']:.3f})" for k, v in ps.items())
        + (f"; ONNX Runtime speed-up {result['step_speedup']:.2f}x." if result.get("step_speedup") else "."),
        "",
    ]
    return "\n".join(lines)


def bench_latency(cfg: LatencyBench, score: ScoreFn | None = None) -> dict:
    """Time every row of ``cfg``, score the rows ``score`` is given for (None: latency only, unless a score
    is reused from ``scores_from`` / ``eager_reports``), write ``cfg.out``; returns latency.json's content.

    ONNX exports made here (no ``cfg.onnx``; one-step students) go to temporary directories that are
    removed when the benchmark ends, whether it returns or raises.
    """
    with contextlib.ExitStack() as stack:

        def scratch() -> Path:
            return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vlaflow-bench-")))

        return _bench(cfg, score, scratch)


def _bench(cfg: LatencyBench, score: ScoreFn | None, scratch: Callable[[], Path]) -> dict:
    import torch

    from vlaflow.deploy.onnx_runtime import OnnxPolicy, load_onnx_policy, read_manifest
    from vlaflow.deploy.parity import random_obs
    from vlaflow.policies.checkpoint import load_checkpoint
    from vlaflow.policies.runtime import PolicyRuntime, load_policy

    torch.set_num_threads(cfg.threads)
    ckpt = Path(cfg.checkpoint)
    policy = load_checkpoint(ckpt)
    variants = list(cfg.variants) or default_variants(policy)
    exported = False
    onnx_dir = Path(cfg.onnx) if cfg.onnx else None
    if onnx_dir is None and "onnxruntime" in cfg.runtimes:
        from vlaflow.deploy.export import ExportOptions, export_policy

        onnx_dir = scratch() / "onnx"
        exported = True
        print(f"exporting {ckpt} -> {onnx_dir} (parity-checked) ...", file=sys.stderr)
        checked = list(variants)
        if cfg.rti:
            r = RTIConfig()
            checked += [(r.sampler, r.num_steps)] if (r.sampler, r.num_steps) not in checked else []
        opts = ExportOptions(samplers=tuple(checked), n_parity_obs=1)
        export_policy(policy, onnx_dir, opts, source=str(ckpt))
    if onnx_dir is not None:
        read_manifest(onnx_dir)
    rng = np.random.default_rng(0)
    obs = random_obs(policy, rng)
    episodes = cfg.episodes
    previous = {}
    for f in cfg.scores_from:
        for r in json.loads(Path(f).read_text())["rows"]:
            if r.get("mean_score") is not None:
                src = r.get("score_source")
                previous[(r["variant"], r["runtime"])] = {
                    **r,
                    "score_source": f if src in (None, "this run") else src,
                }
    rows, samples = [], {}
    load_before = [round(v, 2) for v in os.getloadavg()]

    def add(variant, runtime, nfe, ms, factory, report=None, realtime=None):
        row = {"variant": variant, "runtime": runtime, "nfe": nfe, **_percentiles(ms)}
        row.update({"mean_score": None, "success_rate": None, "episodes": 0, "score_source": None})
        reused = _reuse_report(report, episodes) if report else None
        old = previous.get((variant, runtime))
        if old is not None:
            row.update({k: old[k] for k in ("mean_score", "success_rate", "episodes", "score_source")})
        elif reused is not None:
            row.update(reused)
        elif (
            score is not None
            and factory is not None
            and runtime in cfg.score_runtimes
            and (not cfg.score_only or f"{variant}/{runtime}" in cfg.score_only)
        ):
            print(f"scoring {variant} / {runtime} on {episodes} PushT episodes ...", file=sys.stderr)
            row.update(score(factory, episodes, cfg.workers, cfg.max_steps, **(realtime or {})))
            row["score_source"] = "this run"
        rows.append(row)
        samples[f"{variant} / {runtime}"] = ms
        print(
            f"{variant:>10} {runtime:<12} nfe {nfe:>6g}  "
            f"p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms"
            + (f"  score {row['mean_score']:.3f}" if row["mean_score"] is not None else ""),
            file=sys.stderr,
        )

    for sampler, steps in variants:
        name = _variant_name(sampler, steps)
        if "torch-eager" in cfg.runtimes:
            rt = PolicyRuntime(policy, sampler=sampler, num_steps=steps, seed=0)
            ms = time_calls(lambda rt=rt: rt.infer(obs), cfg.repeats)
            nfe = steps * (2 if sampler == "heun" else 1) - (1 if sampler == "heun" else 0)
            fac = functools.partial(load_policy, str(ckpt), sampler=sampler, num_steps=steps)
            report = (
                Path(cfg.eager_reports) / f"{sampler}{steps}" / "report.json" if cfg.eager_reports else None
            )
            add(name, "torch-eager", nfe, ms, fac, report)
        if "onnxruntime" in cfg.runtimes:
            op = OnnxPolicy(onnx_dir, sampler=sampler, num_steps=steps, seed=0, threads=cfg.threads)
            ms = time_calls(lambda op=op: op.infer(obs), cfg.repeats)
            fac = functools.partial(
                load_onnx_policy, str(onnx_dir), sampler=sampler, num_steps=steps, threads=cfg.threads
            )
            add(name, "onnxruntime", op.last_nfe, ms, fac)
    if cfg.rti:
        from vlaflow.deploy.rti import RTIRuntime, load_rti_policy  # torch

        rt = RTIRuntime(policy, RTIConfig(n_warm_steps=cfg.rti_warm))
        rt.reset(seed=0)
        label, realtime = rti_label(rt.rti, cfg.rti_exec_horizon, spec_ta=policy.config.n_action_steps)
        warm_kw = {"n_warm_steps": rt.rti.n_warm_steps}
        nfes: list[int] = []

        def rti_call(rt=rt, nfes=nfes):
            rt.infer(obs)
            nfes.append(rt.last_nfe)

        ms = time_calls(rti_call, cfg.repeats, warmup=0)  # the first (full) call is part of the distribution
        fac = functools.partial(load_rti_policy, str(ckpt), **warm_kw)
        add(label, "torch-eager", float(np.mean(nfes)), ms, fac, realtime=realtime)
        if "onnxruntime" in cfg.runtimes:
            from vlaflow.deploy.onnx_rti import OnnxRTIPolicy, load_onnx_rti_policy

            c = rt.rti
            kw = dict(
                sampler=c.sampler, num_steps=c.num_steps, n_warm_steps=c.n_warm_steps, warm_mode=c.warm_mode
            )
            orti = OnnxRTIPolicy(onnx_dir, threads=cfg.threads, **kw)
            ms = time_calls(lambda: orti.infer(obs), cfg.repeats, warmup=0)
            fac = functools.partial(load_onnx_rti_policy, str(onnx_dir), threads=cfg.threads, **kw)
            add(label, "onnxruntime", float(np.mean(orti.nfe_history)), ms, fac, realtime=realtime)
    students = list(cfg.onestep)
    extras = [("one-step" if len(students) == 1 else f"one-step {Path(c).name}", c) for c in students] + [
        ("EBT", cfg.ebt)
    ]
    for label, extra_ckpt in extras:
        if not extra_ckpt:
            continue
        other = load_checkpoint(extra_ckpt)
        rt = PolicyRuntime(other, seed=0)
        ms = time_calls(lambda rt=rt: rt.infer(obs), cfg.repeats)
        nfe = int(getattr(other.config, "num_inference_steps", 1))
        add(label, "torch-eager", nfe, ms, functools.partial(load_policy, str(extra_ckpt)))
        from vlaflow.deploy.export import EXPORTABLE_FAMILIES, ExportOptions, export_policy

        if "onnxruntime" in cfg.runtimes and other.config.family in EXPORTABLE_FAMILIES:
            odir = scratch() / "onnx"
            export_policy(other, odir, ExportOptions(n_parity_obs=1), source=str(extra_ckpt))
            op = OnnxPolicy(odir, seed=0, threads=cfg.threads)
            ms = time_calls(lambda op=op: op.infer(obs), cfg.repeats)
            fac = functools.partial(load_onnx_policy, str(odir), threads=cfg.threads)
            add(label, "onnxruntime", op.last_nfe, ms, fac)

    # One denoiser evaluation at batch 1 in each runtime (the >= 2.5x target is about this number). The two
    # runtimes alternate call by call, so a load change on a shared machine hits both alike.
    pcfg = policy.config
    with torch.inference_mode():
        cond = policy.encode(
            {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in obs.items() if k != "task"}
            | ({"task": [obs["task"]]} if "task" in obs else {})
        )
        x = torch.randn(1, pcfg.horizon, pcfg.action_dim)
        t = torch.tensor([float(policy.path.timesteps(pcfg.num_inference_steps)[0])])
    fns = {}
    if "torch-eager" in cfg.runtimes:

        def eager_step():
            with torch.inference_mode():
                policy.predict(x, t, cond)

        fns["torch-eager"] = eager_step
    if onnx_dir is not None and "onnxruntime" in cfg.runtimes:
        op = OnnxPolicy(onnx_dir, threads=cfg.threads)
        xn, tn, cn = x.numpy(), t.numpy(), cond.numpy()
        fns["onnxruntime"] = lambda: op.predict(xn, tn, cn)
    step_ms: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(cfg.step_repeats + 10):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if i >= 10:  # warm-up
                step_ms[k].append((time.perf_counter() - t0) * 1e3)
    per_step = {k: _percentiles(v) for k, v in step_ms.items()}
    load_after = [round(v, 2) for v in os.getloadavg()]
    speedup = None
    if len(per_step) == 2:
        speedup = per_step["torch-eager"]["p50_ms"] / per_step["onnxruntime"]["p50_ms"]
    result = {
        "benchmark": "latency",
        "checkpoint": str(ckpt),
        "family": pcfg.family,
        "onnx_dir": str(onnx_dir) if onnx_dir and not exported else None,
        "threads": cfg.threads,
        "repeats": cfg.repeats,
        "task": "pusht" if any(r.get("mean_score") is not None for r in rows) else None,  # scores' task
        "score_episodes": episodes,
        "score_seeds": "100000.." + str(100000 + episodes - 1) if episodes else None,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "per_denoiser_step": per_step,
        "step_speedup": speedup,
        "step_speedup_target": 2.5,
        "rows": rows,
        "machine": _machine(),
    }
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "latency.json").write_text(json.dumps(result, indent=1))
        (out / "latency.md").write_text(latency_markdown(result))
        _plot(rows, samples, out / "latency_hist.png", f"{ckpt} - threads {cfg.threads}, load {load_before}")
    return result
