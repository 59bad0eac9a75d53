"""ONNX-vs-PyTorch parity of an export: max-abs and cosine of the encoder, each denoiser step, each chunk.

For each of ``n_parity_obs`` random observations (low-dim uniform over the normalizer's [min, max], images
uniform uint8) and each checked sampler:

- ``step``  : the PyTorch sampler runs with a recording ``predict``; the ONNX denoiser is evaluated on the
  very same (x_t, t, cond) inputs, so a step's error is the graph's alone (native prediction units).
- ``chunk`` : the whole host loop (ONNX encoder -> numpy sampler -> ONNX denoiser) against
  ``policy.denoise`` from the same initial noise and, for DDPM, the same per-step noise (drawn from the
  torch generator in the order ``sample_loop`` draws it). Compared in normalized action units; the raw-unit
  error is reported beside it.

A composed policy goes through the same code: its ``encode`` / ``predict`` are the packed parents'
conditions and the mixed prediction on both sides, so ``step`` checks each parent's graphs and the host
mixing together (each parent's own graphs are also checked alone, in its own export's report).

A steered (DSRL) export is first checked as its base's export (the rows above), then by
:func:`check_steered_parity`: ``noise_actor`` (the actor graph on PyTorch's cond vs the actor's
deterministic noise) and ``steered chunk`` (ONNX encoder -> ONNX actor noise -> the runtime's sampler loop or
unrolled graph, exactly what ``OnnxPolicy.infer`` runs, vs ``base.encode`` -> ``steer`` -> ``base.denoise``,
the chain of ``SteeredRuntime``), each observation's own noise on each side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _metrics(a, b) -> dict:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = 1.0 if na < 1e-12 and nb < 1e-12 else float(a @ b / max(na * nb, 1e-30))
    return {"max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0, "cosine": cos}


def random_obs(policy, rng: np.random.Generator) -> dict:
    """A raw observation window for ``policy`` (To, ...) per key, plus a known instruction if it reads one."""
    import vlaflow.keys as K

    cfg, norm = policy.config, policy.normalizer
    obs = {}
    for k, shape in cfg.obs_shapes.items():
        full = (cfg.n_obs_steps, *shape)
        if K.is_image(k):
            obs[k] = rng.integers(0, 256, size=full, dtype=np.uint8)
        elif k in norm.stats:
            lo, hi = norm.stats[k]["min"], norm.stats[k]["max"]
            obs[k] = (lo + (hi - lo) * rng.uniform(size=full)).astype(np.float32)
        else:
            obs[k] = rng.standard_normal(full).astype(np.float32)
    if policy.text_encoder is not None or policy.spec.extra.get("language"):  # (a composite's parents)
        texts = [*policy.config.tasks, *([policy.spec.task] if policy.spec.task else [])]
        obs["task"] = texts[int(rng.integers(len(texts)))]
    return obs


def _torch_chain(policy, predict, cond, noise: np.ndarray, name: str, steps: int, gen_seed: int):
    """The PyTorch reference chain and the per-step noise it drew (in ``sample_loop``'s order)."""
    import torch

    from vlaflow.policies.samplers import sample_loop

    x_in = torch.from_numpy(noise)
    with torch.inference_mode():
        if name == "onestep":  # consistency student: its own one-evaluation denoise
            predict(x_in, torch.full((1,), float(policy.config.start_time)))
            return policy.denoise(cond, noise=x_in), []
        res = sample_loop(
            predict,
            policy.path,
            x_in,
            parameterization=policy.parameterization,
            sampler=name,
            num_steps=steps,
            generator=torch.Generator().manual_seed(gen_seed),
            **policy.sampler_kwargs(name),
        )
        g = torch.Generator().manual_seed(gen_seed)
        return res, [torch.randn(noise.shape, generator=g).numpy() for _ in range(steps)]


def _judge(summary: list, failures: list, what: str, rows: list[dict], tol: float, min_cosine: float) -> None:
    """The worst of ``rows`` into ``summary``; a failure line when over ``tol`` or under the cosine."""
    if not rows:
        return
    worst = max(r["max_abs"] for r in rows)
    cos = min(r["cosine"] for r in rows)
    summary.append({"what": what, "max_abs": worst, "min_cosine": cos, "tol": tol})
    if not worst <= tol:
        failures.append(f"{what}: max-abs {worst:.3g} > {tol:g}")
    if not cos >= min_cosine:
        failures.append(f"{what}: cosine {cos:.7f} < {min_cosine}")


def check_parity(policy, export_dir: str | Path, samplers, opts) -> dict:
    """Run the comparison on the files in ``export_dir``; returns the JSON-safe report (``passed``, rows)."""
    import torch

    from vlaflow.deploy.onnx_runtime import OnnxPolicy

    ort_pol = OnnxPolicy(export_dir, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(opts.seed)
    cfg = policy.config
    shape = (1, cfg.horizon, cfg.action_dim)
    enc_rows, unrolled_rows = [], []
    per_sampler: dict[str, dict] = {}
    for j in range(opts.n_parity_obs):
        obs = random_obs(policy, rng)
        batch = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in obs.items() if k != "task"}
        if "task" in obs:
            batch["task"] = [obs["task"]]
        with torch.inference_mode():
            cond_t = policy.encode(batch)
        cond_o = ort_pol.encode(obs)
        enc_rows.append({"obs": j, **_metrics(cond_o, cond_t.numpy())})
        noise = rng.standard_normal(shape).astype(np.float32)
        for name, steps in samplers:
            key = f"{name}:{steps}"
            rec = per_sampler.setdefault(
                key, {"sampler": name, "num_steps": steps, "steps": [], "chunks": []}
            )
            seen: list[tuple] = []

            def predict(x, t, cond=cond_t, seen=seen):
                out = policy.predict(x, t, cond)
                seen.append((x.clone(), t.clone(), out.clone()))
                return out

            res, step_noise = _torch_chain(
                policy, predict, cond_t, noise, name, steps, opts.seed + 1000 * j + 1
            )
            for i, (x, t, out) in enumerate(seen):
                m = _metrics(ort_pol.predict(x.numpy(), t.numpy(), cond_t.numpy()), out.numpy())
                if j == 0:
                    rec["steps"].append({"step": i, "t": float(t.reshape(-1)[0]), **m})
                else:  # keep the worst over observations per step
                    row = rec["steps"][i]
                    row["max_abs"] = max(row["max_abs"], m["max_abs"])
                    row["cosine"] = min(row["cosine"], m["cosine"])
            x0_o = ort_pol.denoise(cond_o, noise, name, steps, step_noise=lambda i, _s, sn=step_noise: sn[i])
            x0_t = res.x0.numpy()
            chunk = {"obs": j, **_metrics(x0_o, x0_t)}
            chunk["max_abs_raw"] = float(
                np.max(np.abs(ort_pol.unnormalize_action(x0_o) - ort_pol.unnormalize_action(x0_t)))
            )
            chunk["nfe"] = ort_pol.last_nfe
            rec["chunks"].append(chunk)
        if ort_pol.unrolled is not None:
            u = ort_pol.manifest["graphs"]["unrolled"]["sampler"]
            with torch.inference_mode():
                ref = policy.denoise(
                    cond_t, noise=torch.from_numpy(noise), sampler=u["name"], num_steps=u["num_steps"]
                )
            unrolled_rows.append({"obs": j, **_metrics(ort_pol.run_unrolled(cond_o, noise), ref.x0.numpy())})

    failures, summary = [], []

    def judge(what: str, rows: list[dict], tol: float) -> None:
        _judge(summary, failures, what, rows, tol, opts.min_cosine)

    judge("encoder", enc_rows, opts.tol_step)
    for key, rec in per_sampler.items():
        judge(f"{key} step", rec["steps"], opts.tol_step)
        judge(f"{key} chunk", rec["chunks"], opts.tol_chunk)
    judge("unrolled chunk", unrolled_rows, opts.tol_chunk)
    return {
        "passed": not failures,
        "failures": failures,
        "thresholds": {
            "step_max_abs": opts.tol_step,
            "chunk_max_abs": opts.tol_chunk,
            "min_cosine": opts.min_cosine,
        },
        "n_obs": opts.n_parity_obs,
        "summary": summary,
        "encoder": enc_rows,
        "samplers": per_sampler,
        "unrolled": unrolled_rows,
        "note": "step: native prediction units; chunk: normalized action units (max_abs_raw: dataset units)",
    }


def check_steered_parity(steered, export_dir: str | Path, opts, report: dict) -> dict:
    """Add a steered export's rows (``noise_actor``, ``steered chunk``) to ``report`` (its base's, from
    :func:`check_parity`) and re-judge ``passed``; returns ``report``."""
    import torch

    from vlaflow.deploy.onnx_runtime import OnnxPolicy

    base = steered.base
    ort_pol = OnnxPolicy(export_dir, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(opts.seed + 7)  # observations of their own, not the base rows' again
    name, steps = ort_pol.sampler, ort_pol.num_steps  # the base's configured sampler: what infer runs
    actor_rows, chunk_rows = [], []
    for j in range(opts.n_parity_obs):
        obs = random_obs(base, rng)
        batch = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in obs.items() if k != "task"}
        if "task" in obs:
            batch["task"] = [obs["task"]]
        with torch.inference_mode():
            cond_t = base.encode(batch)
            w_t = steered.steer(cond_t).numpy()  # (1, H, Da)
        actor_rows.append({"obs": j, **_metrics(ort_pol.initial_noise(cond_t.numpy()), w_t)})
        res, step_noise = _torch_chain(
            base,
            lambda x, t, c=cond_t: base.predict(x, t, c),
            cond_t,
            w_t,
            name,
            steps,
            opts.seed + 1000 * j + 7,
        )
        cond_o = ort_pol.encode(obs)
        w_o = ort_pol.initial_noise(cond_o)
        if ort_pol.uses_unrolled:
            x0_o = ort_pol.run_unrolled(cond_o, w_o)
        else:
            x0_o = ort_pol.denoise(cond_o, w_o, step_noise=lambda i, _s, sn=step_noise: sn[i])
        x0_t = res.x0.numpy()
        chunk = {"obs": j, **_metrics(x0_o, x0_t), "noise_max_abs": float(np.max(np.abs(w_o - w_t)))}
        chunk["max_abs_raw"] = float(
            np.max(np.abs(ort_pol.unnormalize_action(x0_o) - ort_pol.unnormalize_action(x0_t)))
        )
        chunk["nfe"] = ort_pol.last_nfe
        chunk_rows.append(chunk)
    _judge(report["summary"], report["failures"], "noise_actor", actor_rows, opts.tol_step, opts.min_cosine)
    what = f"steered {name}:{steps}{' unrolled' if ort_pol.uses_unrolled else ''} chunk"
    _judge(report["summary"], report["failures"], what, chunk_rows, opts.tol_chunk, opts.min_cosine)
    report["steered"] = {
        "sampler": name,
        "num_steps": steps,
        "unrolled": ort_pol.uses_unrolled,
        "noise_actor": actor_rows,
        "chunks": chunk_rows,
    }
    report["passed"] = not report["failures"]
    return report
