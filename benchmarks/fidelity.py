"""Gradient fidelity of every gradient mode, the outcome it buys, and why they differ (issue 15).

    python benchmarks/fidelity.py                    # grid, run states, experiments: ~8 min of CPU
    python benchmarks/fidelity.py --quick            # a small grid (~1 min of CPU), written beside the JSON
    python benchmarks/fidelity.py --stages outcome   # the 3-seed outcome runs (~37 min of CPU)
    python benchmarks/fidelity.py --tables-only      # rebuild tables and figures from the saved JSON

Measured (single-threaded, on a 2-core CPU shared with three other engineers' jobs and this
benchmark's own outcome workers): grid 188 s CPU / 902 s wall, run states 138 / 697, experiments
171 / 1035; an idle machine runs each stage in about its CPU time. Cut to fit: 4 samples per
gradient, LCM only at 1-5 steps, x_t only for N >= 4, Picard lambda only for DDIM, LoRA at its
start (B = 0), the run states for x_T only.

Fidelity: the cosine and norm ratio of each mode's gradient to the exact one (``FullBackprop``)
of the shipped digits classifier's summed -log p(7) (no augmentation, so deterministic), on 4
unconditional samples, for SDO, SDO with 2 and 4 kept calls, truncated backprop with K = 1, 2, 5,
AlignProp-uniform and DRTune (k=5), across solvers (DDIM, DPM-Solver++, LCM at 1-5 steps on the
DDPM; Euler on the flow model), step counts 1-50, targets (x_T; x_t after 1/4, 1/2, 3/4 of the
calls; the class embedding; LoRA adapters at their start), the trained digits models against the
same architectures with random weights, and along the quickstart's optimization (steps 0, 25, 50).
Modes that draw are reported by their expectation over all draws and by the mean single draw
(see ``benchmarks/_fidelity_core.py``). Latent targets have no truncated rows: truncation
cannot reach them.

Outputs: ``docs/fidelity_results/*.json``, ``docs/fidelity_tables.md`` and ``docs/fidelity_*.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import _fidelity_core as core
import _fidelity_explain as explain

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "fidelity_results"
DOCS = ROOT / "docs"


def solvers_for(kind: str, steps: int) -> list[tuple[str, Any]]:
    from sdo_lightning.solvers import DDIM, DPMSolverPlusPlus, FlowMatchEuler, LCMMultistep

    if kind == "flow":
        return [("FlowMatchEuler", FlowMatchEuler(steps))]
    out = [("DDIM", DDIM(steps)), ("DPM-Solver++", DPMSolverPlusPlus(steps))]
    if steps <= 5:  # LCM is a few-step sampler (and the digits model is not LCM-distilled)
        out.append(("LCM", LCMMultistep(steps)))
    return out


def _rows(base: dict[str, Any], modes: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    return [{**base, "mode": mode, **values} for mode, values in modes.items()]


def _latent_rows(base: dict[str, Any], setting: core.Setting) -> list[dict[str, Any]]:
    grads = core.latent_grads(setting)
    exact = grads["exact"]
    modes = {name: {"cos_expect": core.cosine(g, exact), "ratio_expect": core.ratio(g, exact),
                    "cos_draw": core.cosine(g, exact), "ratio_draw": core.ratio(g, exact)} for name, g in grads.items()}
    base = {**base, "exact_norm": exact.norm().item()}
    return _rows(base, modes)


def grid(steps_list: list[int], kinds: list[str], targets: list[str], batch: int, progress: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        for trained in (True, False):
            backbone = core.load_backbone(kind, trained)
            lora_backbone = core.load_backbone(kind, trained) if "lora" in targets else None
            names = core.lora_names(lora_backbone) if lora_backbone is not None else None
            for steps in steps_list:
                for solver_name, solver in solvers_for(kind, steps):
                    base = {"model": kind, "trained": trained, "solver": solver_name, "steps": steps}
                    setting = core.make_setting(backbone, solver, batch)
                    if "x_T" in targets:
                        rows += _latent_rows({**base, "target": "x_T"}, setting)
                        if solver_name == "DDIM":
                            lam = explain.picard_lambda(setting)
                            rows[-1]["picard_lambda"] = rows[-2]["picard_lambda"] = rows[-3]["picard_lambda"] = lam
                    if "x_t" in targets and steps >= 4:
                        for frac in (0.25, 0.5, 0.75):
                            c = max(1, round(frac * steps))
                            sub = core.make_setting(backbone, solver, batch, start_call=c)
                            rows += _latent_rows({**base, "target": f"x_t ({frac:g})", "start_call": c}, sub)
                    for wrt in ("embedding", "lora"):
                        if wrt not in targets:
                            continue
                        bb = backbone if wrt == "embedding" else lora_backbone
                        s = core.make_setting(bb, solver, batch)
                        exact_terms = core.per_call_terms(s, wrt, False, names)
                        sg_terms = core.per_call_terms(s, wrt, True, names)
                        modes = core.parameter_modes(exact_terms, sg_terms)
                        rows += _rows({**base, "target": wrt, "exact_norm": exact_terms.sum(0).norm().item()}, modes)
                    progress.update(1)
    return rows


def along_run(kind: str, steps: int, batch: int, snapshot_steps: list[int]) -> tuple[list[dict[str, Any]], dict]:
    """Fidelity at the quickstart's x_T after 0, steps/2 and ``steps`` Adam steps of SDO."""
    from lightning.pytorch import Callback

    from sdo_lightning.cli import main

    config = ROOT / "configs" / ("quickstart.yaml" if kind == "ddpm" else "digits/flow_quickstart.yaml")
    snaps: dict[int, torch.Tensor] = {}

    class Snap(Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step in snapshot_steps:
                snaps[trainer.global_step] = module.variable.detach().clone()

        def on_train_end(self, trainer: Any, module: Any) -> None:
            snaps[trainer.global_step] = module.variable.detach().clone()

    import tempfile

    cli = main(["--config", str(config), "--trainer.max_steps", str(steps), "--data.init_args.num_samples", str(batch),
                "--trainer.logger", "false", "--trainer.default_root_dir", tempfile.mkdtemp(),
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"], run=False)
    cli.trainer.callbacks.append(Snap())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model
    backbone, solver = module.backbone, module.solver
    rows = []
    for step, x in sorted(snaps.items()):
        setting = core.Setting(backbone, solver, x, module.start_cond.clone())
        base = {"model": kind, "trained": True, "solver": type(solver).__name__, "steps": solver.num_inference_steps,
                "target": "x_T", "opt_step": step}
        part = _latent_rows(base, setting)
        if kind == "ddpm":
            lam = explain.picard_lambda(setting)
            for r in part:
                r["picard_lambda"] = lam
        part[0]["loss"] = core.loss_of_images(core.run(setting, x, setting.cond, None, core.Target.latent())).item() / len(x)
        rows += part
    return rows, {step: x.tolist() for step, x in snaps.items()}


def experiments(quick: bool, batch: int) -> dict[str, Any]:
    from sdo_lightning.solvers import DDIM, DPMSolverPlusPlus, FlowMatchEuler

    out: dict[str, Any] = {"descent": {}, "depth": {}, "eq18": {}, "lora_depth": {}}
    ddpm, flow = core.load_backbone("ddpm", True), core.load_backbone("flow", True)
    ddpm_random = core.load_backbone("ddpm", False)
    n = 10 if quick else 50
    cases = {"DDPM trained, DDIM": (ddpm, DDIM(n)), "DDPM random, DDIM": (ddpm_random, DDIM(n)),
             "DDPM trained, DPM-Solver++": (ddpm, DPMSolverPlusPlus(min(n, 20))),
             "flow trained, Euler": (flow, FlowMatchEuler(n))}
    lengths = [0.003, 0.01, 0.03, 0.1, 0.2, 0.3] if not quick else [0.01, 0.1]
    sign_lrs = [0.01, 0.02, 0.05, 0.1, 0.2] if not quick else [0.05]
    for name, (bb, solver) in cases.items():
        setting = core.make_setting(bb, solver, batch)
        out["descent"][name] = explain.descent(setting, lengths, sign_lrs)
        out["depth"][name] = explain.depth_norms(setting)
        out["eq18"][name] = explain.eq18_check(setting)
    # paper Fig. 11a on LoRA: the truncated gradient's norm by depth K, and the SDO terms' norms
    lora_bb = core.load_backbone("ddpm", True)
    names = core.lora_names(lora_bb)
    setting = core.make_setting(lora_bb, DDIM(min(n, 20)), batch)
    exact_terms = core.per_call_terms(setting, "lora", False, names)
    sg_terms = core.per_call_terms(setting, "lora", True, names)
    suffix = exact_terms.flip(0).cumsum(0).flip(0)
    m = len(exact_terms)
    out["lora_depth"] = {"steps": m, "truncated_norm_by_k": [suffix[m - k].norm().item() for k in range(1, m + 1)],
                         "exact_term_norm_by_call": [t.norm().item() for t in exact_terms],
                         "sdo_term_norm_by_call": [t.norm().item() for t in sg_terms],
                         "exact_norm": exact_terms.sum(0).norm().item(), "eq16_norm": sg_terms.sum(0).norm().item()}
    return out


def skip_vs_sdo(batch: int, steps_list: list[int]) -> list[dict[str, Any]]:
    """Cosine between SDO's x_T gradient and the skip path alone (DRTune on a latent: no network
    Jacobian), on the trained models."""
    from sdo_lightning.gradient_modes import DRTune, ShortcutGradient
    from sdo_lightning.solvers import DDIM, DPMSolverPlusPlus, FlowMatchEuler

    rows = []
    for kind, make in (("ddpm", DDIM), ("ddpm", DPMSolverPlusPlus), ("flow", FlowMatchEuler)):
        backbone = core.load_backbone(kind, True)
        for steps in steps_list:
            setting = core.make_setting(backbone, make(steps), batch)
            sdo, skip = core.latent_grad(setting, ShortcutGradient()), core.latent_grad(setting, DRTune(k=5))
            rows.append({"model": kind, "solver": make.__name__, "steps": steps, "cos_sdo_skip": core.cosine(sdo, skip)})
    return rows


# -- tables and figures ---------------------------------------------------------------------------------
STAGES = ["grid", "along_run", "explain", "skip", "outcome"]
MODE_ORDER = ["SDO", "SDO unbiased", "SDO num_kept=2", "SDO num_kept=4", "Truncated K=1", "Truncated K=2",
              "Truncated K=5", "AlignProp-uniform", "DRTune(k=5)"]


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def tables(data: dict[str, Any]) -> str:
    rows = data.get("grid", [])
    lines = ["# Gradient fidelity: measured tables", "",
             f"Generated by `python benchmarks/fidelity.py{' --quick' if data.get('quick') else ''}` "
             f"(wall / CPU seconds per stage on a shared 2-core CPU: "
             + ", ".join(f"{k} {v[0]:.0f} / {v[1]:.0f}" for k, v in data.get("seconds", {}).items()) + "). "
             "Cosine / norm ratio to the exact gradient (FullBackprop). For modes that draw: `E` = of the "
             "expectation over all draws, `1` = mean over single draws. Norm ratios at each mode's default scale "
             "(SDO `paper`: one call's gradient as it is; `SDO unbiased` multiplies it by N).", ""]
    for target in ("x_T", "x_t (0.5)", "embedding", "lora"):
        sub = [r for r in rows if r["target"] == target]
        if not sub:
            continue
        modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in sub)]
        lines += [f"## Target: {target}", "",
                  "| model | solver | N | " + " | ".join(modes) + " |",
                  "|---|---|---|" + "---|" * len(modes)]
        keys = sorted({(r["model"], r["trained"], r["solver"], r["steps"]) for r in sub},
                      key=lambda k: (k[0], not k[1], k[2], k[3]))
        for key in keys:
            cells = []
            for m in modes:
                r = next((r for r in sub if (r["model"], r["trained"], r["solver"], r["steps"]) == key and r["mode"] == m), None)
                if r is None:
                    cells.append("-")
                elif abs(r["cos_expect"] - r["cos_draw"]) < 1e-9:
                    cells.append(f"{_fmt(r['cos_expect'])} / {_fmt(r['ratio_expect'])}")
                else:
                    cells.append(f"E {_fmt(r['cos_expect'])} / {_fmt(r['ratio_expect'])}; 1 {_fmt(r['cos_draw'])} / "
                                 f"{_fmt(r['ratio_draw'])}")
            model = f"{key[0]} {'trained' if key[1] else 'random'}"
            lines.append(f"| {model} | {key[2]} | {key[3]} | " + " | ".join(cells) + " |")
        lines.append("")
    xt = [r for r in rows if r["target"].startswith("x_t") and r["mode"] == "SDO"]
    if xt:
        lines += ["## SDO on x_t (cosine / norm ratio), by where x_t sits in the chain", "",
                  "| model | solver | N | x_t after 1/4 | 1/2 | 3/4 |", "|---|---|---|---|---|---|"]
        keys = sorted({(r["model"], r["trained"], r["solver"], r["steps"]) for r in xt}, key=lambda k: (k[0], not k[1], k[2], k[3]))
        for key in keys:
            cells = []
            for frac in ("0.25", "0.5", "0.75"):
                r = next((r for r in xt if (r["model"], r["trained"], r["solver"], r["steps"]) == key
                          and r["target"] == f"x_t ({frac})"), None)
                cells.append("-" if r is None else f"{_fmt(r['cos_expect'])} / {_fmt(r['ratio_expect'])}")
            lines.append(f"| {key[0]} {'trained' if key[1] else 'random'} | {key[2]} | {key[3]} | " + " | ".join(cells) + " |")
        lines.append("")
    run_rows = data.get("along_run", [])
    if run_rows:
        lines += ["## Along the quickstart's optimization (SDO, x_T, 50-step solver)", "",
                  "| model | Adam step | loss (-log p(7), mean) | SDO cos / ratio | DRTune cos / ratio | Picard lambda |",
                  "|---|---|---|---|---|---|"]
        for kind in ("ddpm", "flow"):
            for step in sorted({r["opt_step"] for r in run_rows if r["model"] == kind}):
                rs = {r["mode"]: r for r in run_rows if r["model"] == kind and r["opt_step"] == step}
                if not rs:
                    continue
                lam = rs["SDO"].get("picard_lambda", float("nan"))
                lines.append(f"| {kind} | {step} | {_fmt(rs['exact'].get('loss', float('nan')))} | "
                             f"{_fmt(rs['SDO']['cos_expect'])} / {_fmt(rs['SDO']['ratio_expect'])} | "
                             f"{_fmt(rs['DRTune(k=5)']['cos_expect'])} / {_fmt(rs['DRTune(k=5)']['ratio_expect'])} | {_fmt(lam)} |")
        lines.append("")
    skip = data.get("skip_vs_sdo")
    if skip:
        lines += ["## SDO's x_T gradient against the skip path alone (DRTune on a latent), trained models", "",
                  "| model | solver | N | cosine |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['solver']} | {r['steps']} | {r['cos_sdo_skip']:.4f} |" for r in skip]
        lines.append("")
    ex = data.get("explain")
    if ex:
        lines += ["## Experiments", "", "### (c) SDO is the exact gradient of the stop-gradient chain (Eq. 18-19), float64", "",
                  "| setting | rel. diff SDO vs hand-written chain | surrogate FD | SDO directional derivative | exact directional derivative | cos SDO-exact |",
                  "|---|---|---|---|---|---|"]
        for name, r in ex["eq18"].items():
            lines.append(f"| {name} | {r['rel_diff_sdo_vs_chain']:.2e} | {r['fd_surrogate']:.6g} | {r['sdo_directional']:.6g} | "
                         f"{r['exact_directional']:.6g} | {_fmt(r['cos_sdo_exact'])} |")
        lines += ["", "### (a) true loss change after one step (mean -log p(7) per sample; negative = better)", ""]
        for name, r in ex["descent"].items():
            lines += [f"**{name}** (base loss {_fmt(r['base_loss'])}, cos SDO-exact {_fmt(r['cos_sdo_exact'])})", "",
                      "| direction | " + " | ".join(f"r={v:g}" for v in r["lengths"]) + " | "
                      + " | ".join(f"sign lr={v:g}" for v in r["sign_lrs"]) + " |",
                      "|---|" + "---|" * (len(r["lengths"]) + len(r["sign_lrs"]))]
            for d in r["normalized"]:
                lines.append(f"| {d} | " + " | ".join(_fmt(v) for v in r["normalized"][d]) + " | "
                             + " | ".join(_fmt(v) for v in r["sign"][d]) + " |")
            lines.append("")
        lines += ["### (b) exact gradient norm by backprop depth (mean over samples of ||dL/dx_k||)", "",
                  "| setting | depth 0 (x_0) | 1 | 5 | 10 | N (x_T) | skip path only at x_T |", "|---|---|---|---|---|---|---|"]
        for name, r in ex["depth"].items():
            e = r["exact"]
            pick = [e[i] if i < len(e) else float("nan") for i in (0, 1, 5, 10)]
            lines.append(f"| {name} | " + " | ".join(_fmt(v) for v in pick) + f" | {_fmt(e[-1])} | {_fmt(r['skip path only'][-1])} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def figures(data: dict[str, Any], folder: Path = DOCS) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the figures need matplotlib: pip install matplotlib (or pass --no-figures).") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = data.get("grid", [])
    # 1. cosine by step count, one panel per target, lines per (model, solver) for SDO
    targets = [t for t in ("x_T", "x_t (0.5)", "embedding", "lora") if any(r["target"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), squeeze=False)
    for ax, target in zip(axes[0], targets):
        sub = [r for r in rows if r["target"] == target and r["mode"] == "SDO"]
        for key in sorted({(r["model"], r["trained"], r["solver"]) for r in sub}):
            pts = sorted((r["steps"], r["cos_expect"]) for r in sub if (r["model"], r["trained"], r["solver"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if key[1] else ":",
                    label=f"{key[0]} {'trained' if key[1] else 'random'} {key[2]}")
        ax.set_xscale("log")
        ax.set_ylim(-0.1, 1.05)
        ax.set_xlabel("sampling steps N")
        ax.set_title(f"SDO vs exact, target {target}" + (" (E over draws)" if target in ("embedding", "lora") else ""))
        ax.set_ylabel("cosine")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(folder / "fidelity_cosine.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 2. every mode on the parameter targets, trained DDPM + DDIM
    sub = [r for r in rows if r["model"] == "ddpm" and r["trained"] and r["solver"] == "DDIM" and r["target"] in ("embedding", "lora")]
    if sub:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, target in zip(axes, ("embedding", "lora")):
            for mode in MODE_ORDER:
                if mode == "SDO unbiased":
                    continue
                pts = sorted((r["steps"], r["cos_expect"], r["cos_draw"]) for r in sub if r["target"] == target and r["mode"] == mode)
                if pts:
                    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{mode}")
                    if any(abs(p[1] - p[2]) > 1e-9 for p in pts):
                        ax.plot([p[0] for p in pts], [p[2] for p in pts], ls=":", color=line.get_color())
            ax.set_xscale("log")
            ax.set_xlabel("sampling steps N")
            ax.set_ylabel("cosine to exact")
            ax.set_title(f"trained DDPM, DDIM, target {target}\n(solid: expectation, dotted: single draw)", fontsize=9)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        paths.append(folder / "fidelity_modes.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    ex = data.get("explain")
    if ex:
        # 3. descent
        fig, axes = plt.subplots(2, len(ex["descent"]), figsize=(4 * len(ex["descent"]), 6.5), squeeze=False)
        for j, (name, r) in enumerate(ex["descent"].items()):
            for d, vals in r["normalized"].items():
                axes[0][j].plot(r["lengths"], vals, marker="o", label=d)
                axes[1][j].plot(r["sign_lrs"], r["sign"][d], marker="o", label=d)
            axes[0][j].set_xscale("log")
            axes[1][j].set_xscale("log")
            axes[0][j].axhline(0, color="k", lw=0.5)
            axes[1][j].axhline(0, color="k", lw=0.5)
            axes[0][j].set_title(f"{name}\ncos SDO-exact {r['cos_sdo_exact']:.2f}", fontsize=9)
            axes[0][j].set_xlabel("step length / ||x_T|| (unit direction)")
            axes[1][j].set_xlabel("sign step lr (Adam's first step)")
            axes[0][j].set_ylabel("true loss change")
            axes[1][j].set_ylabel("true loss change")
            axes[0][j].grid(alpha=0.3)
            axes[1][j].grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(folder / "fidelity_descent.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
        # 4. depth
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for name, r in ex["depth"].items():
            line, = axes[0].plot(range(len(r["exact"])), r["exact"], label=f"{name}: exact")
            axes[0].plot(range(len(r["skip path only"])), r["skip path only"], ls=":", color=line.get_color())
        axes[0].set_yscale("log")
        axes[0].set_xlabel("backprop depth k (calls between x_k and x_0)")
        axes[0].set_ylabel("||dL/dx_k|| (dotted: skip path only)")
        axes[0].legend(fontsize=6)
        axes[0].grid(alpha=0.3)
        ld = ex["lora_depth"]
        ks = range(1, ld["steps"] + 1)
        axes[1].plot(ks, ld["truncated_norm_by_k"], marker="o", label="truncated backprop, last K calls")
        axes[1].axhline(ld["eq16_norm"], color="C1", ls="--", label="Eq. 16 (SDO expectation x N)")
        axes[1].plot(ks, [ld["sdo_term_norm_by_call"][ld["steps"] - k] for k in ks], marker=".", ls=":",
                     label="SDO single call K from the end")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("K")
        axes[1].set_ylabel("LoRA gradient norm")
        axes[1].set_title(f"LoRA, trained DDPM, DDIM {ld['steps']} (paper Fig. 11a)", fontsize=9)
        axes[1].legend(fontsize=7)
        axes[1].grid(alpha=0.3)
        fig.tight_layout()
        paths.append(folder / "fidelity_depth.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    # 5. lambda vs cosine
    lam_rows = [r for r in rows if r["mode"] == "SDO" and "picard_lambda" in r] + \
        [r for r in data.get("along_run", []) if r["mode"] == "SDO" and "picard_lambda" in r]
    if lam_rows:
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for trained in (True, False):
            pts = [(r["picard_lambda"], r["cos_expect"], r["steps"]) for r in lam_rows if r["trained"] == trained]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label="trained" if trained else "random")
            for p in pts:
                ax.annotate(str(p[2]), (p[0], p[1]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("Picard lambda (diagnostics estimate)")
        ax.set_ylabel("SDO cosine to exact (x_T)")
        ax.set_title("DDIM, x_T; labels: steps N", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(folder / "fidelity_lambda.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (1-2 minutes)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=["grid", "along_run", "explain", "skip"],
                        help="what to (re)compute; the others are read from the saved JSON (outcome: the "
                             "3-seed outcome runs, ~1 h on a shared 2-core CPU)")
    parser.add_argument("--tables-only", action="store_true", help="rebuild tables and figures from the saved JSON")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the JSON results")
    parser.add_argument("--no-figures", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("fidelity_quick.json" if args.quick else "fidelity.json")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    stages = set(args.stages)
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() and (args.tables_only or stages != set(STAGES)) else {}
    if not args.tables_only:
        from tqdm.auto import tqdm

        if args.quick:
            steps, kinds, batch = [2, 5], ["ddpm"], 2
        else:
            steps, kinds, batch = [1, 2, 5, 10, 20, 50], ["ddpm", "flow"], 4
        data["quick"] = args.quick
        seconds = data.setdefault("seconds", {})
        for stage in STAGES:
            if stage not in stages:
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            if stage == "grid":
                total = sum(len(solvers_for(k, s)) for k in kinds for s in steps) * 2
                with tqdm(total=total, desc="fidelity grid") as bar:
                    data["grid"] = grid(steps, kinds, ["x_T", "x_t", "embedding", "lora"], batch, bar)
            elif stage == "along_run":
                data["along_run"] = []
                for kind in kinds:
                    opt_steps = 4 if args.quick else 50
                    data["along_run"] += along_run(kind, opt_steps, batch if args.quick else 8, [0, opt_steps // 2])[0]
            elif stage == "explain":
                data["explain"] = experiments(args.quick, batch)
            elif stage == "skip":
                data["skip_vs_sdo"] = skip_vs_sdo(batch, [10] if args.quick else [10, 50])
            elif stage == "outcome":
                import _fidelity_outcome as outcome

                outcome.run_all("latent", list(outcome.LATENT_MODES), [0, 1, 2], out / "outcome_latent.json")
                outcome.run_all("lora", list(outcome.LORA_MODES), [0, 1, 2], out / "outcome_lora.json")
            seconds[stage] = [time.perf_counter() - wall, time.process_time() - cpu]
            path.write_text(json.dumps(data, indent=1) + "\n")  # after every stage: a crash keeps the rest
    text = tables(data)
    outcome_text = outcome_tables(out)
    if outcome_text:
        text += "\n" + outcome_text
    if not args.quick:
        (DOCS / "fidelity_tables.md").write_text(text)
    else:
        (out / "fidelity_quick.md").write_text(text)
    if not args.no_figures:
        figures(data, out if args.quick else DOCS)
    print(text)
    return data


def outcome_tables(out: Path) -> str:
    """Mean +- 95% CI over seeds of the outcome runs found in ``out``."""
    import _fidelity_outcome as outcome

    lines = []
    for task, title in (("latent", "Latent x_T: configs/quickstart.yaml, 50 Adam steps, 16 samples"),
                        ("lora", "LoRA: configs/digits/finetune_lora.yaml, 100 steps, gradient_clip_val 1.0, judged on 64 fresh samples")):
        files = sorted(out.glob(f"outcome_{task}*.json"))  # runs may be split over several workers' files
        if not files:
            continue
        rows = list({(r["mode"], r["seed"]): r for f in files for r in json.loads(f.read_text())}.values())
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        keys = ["objective", "target_prob", "judge_target", "wall_s", "cpu_s", "saved_bytes"]
        if task == "lora":
            keys += ["grad_norm_median", "grad_norm_max", "clipped_share"]
        lines += [f"## Outcome, {title}", "",
                  f"Mean ± 95% CI (Student t) over seeds; objective = {'mean best loss of the quickstart objective' if task == 'latent' else '-log p(7) of the shipped classifier'}; "
                  "judge = share the pixel logistic regression calls a 7; saved_bytes = largest bytes saved for backward in one step; "
                  "wall/CPU seconds on a CPU shared with other jobs.", "",
                  "| mode | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for mode in modes:
            rs = [r for r in rows if r["mode"] == mode]
            cells = []
            for k in keys:
                m, h = outcome.mean_ci([r[k] for r in rs])
                if k == "saved_bytes":
                    cells.append(f"{m / 2**20:.1f} MiB")
                else:
                    cells.append(f"{_fmt(m)} ± {_fmt(h)}" if h == h else _fmt(m))
            lines.append(f"| {mode} | {len(rs)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
