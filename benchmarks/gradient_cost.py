"""Cost of one gradient through diffusion sampling, per gradient mode, relative to no-grad sampling.

For each backbone x solver x target x gradient mode this measures the wall time and the peak
memory of ONE gradient (forward sampling through :func:`sdo_lightning.sample` with the backbone's
``denoise``, the backbone's ``decode`` (the VAE, with its scaling factor, where there is one), a
scalar objective of the images, ``backward()``) and of no-grad sampling (same trajectory, decode
and objective under ``torch.no_grad()``), and prints the ratios.

Backbones: the project's own (``sdo_lightning.backbones``), around diffusers pipelines built in
memory with random weights from the published configs (benchmarks/_models.py; nothing is
downloaded). Conditioning and classifier-free guidance are the backbones'.

* ``tiny``: ``PixelUNetBackbone.from_pipeline(DDPMPipeline(...))`` on a small ``UNet2DModel``
  (3x16x16, block_out_channels (32, 64), one attention block); objective = mean(image * fixed
  random weights), the image being the decoded x_0 in [0, 1].
* ``sd15``: ``StableDiffusionBackbone.from_pipeline`` (guidance 7.5, ``--guidance``) on a
  ``StableDiffusionPipeline`` with an SD-1.5-sized ``UNet2DConditionModel``, SD's
  ``AutoencoderKL`` and a one-layer random CLIP text encoder of width 768 (the prompt's
  embeddings come from it: UNet batch 2 with the empty negative prompt); bf16 on CUDA, fp32 on
  CPU. Objective = mean(image * fixed random weights). The ``parameters`` target trains only the
  attention projections (to_q, to_k, to_v, to_out.0). ``full`` is skipped unless ``--include-full-sd``.
* ``pixart``: ``PixArtAlphaBackbone.from_pipeline`` (guidance 4.5) on a ``PixArtAlphaPipeline``
  with a PixArt-XL-2-512-sized ``PixArtTransformer2DModel`` (28 blocks, width 1152, learned sigma:
  the backbone uses the epsilon half), the same VAE and a one-layer random T5 encoder of width
  4096 (120 tokens with their mask); bf16 on CUDA. ``full`` is skipped unless ``--include-full-sd``.
* ``sdxl``: ``StableDiffusionXLBackbone.from_pipeline`` (guidance 5.0) on a
  ``StableDiffusionXLPipeline`` with SDXL-base-1.0's ``UNet2DConditionModel`` (2.57B), the SD VAE
  with SDXL's scaling 0.13025 and two 2-layer random CLIPs of widths 768 and 1280 (pooled 1280).
* ``sd3``: ``StableDiffusion3Backbone.from_pipeline`` (guidance 7.0) on a ``StableDiffusion3Pipeline``
  with SD3-medium's ``SD3Transformer2DModel`` (2.03B; ``--sd3-variant 3.5-medium``: MMDiT-X, 2.24B),
  a 16-channel VAE (1.5305 / 0.0609), random CLIPs (768, 1280) and a 1-layer T5 of width 4096.
* ``flux``: ``FluxBackbone.from_pipeline`` (embedded guidance 3.5, one call per step) on a
  ``FluxPipeline`` with FLUX.1-dev's ``FluxTransformer2DModel`` (11.9B; ``--flux-variant schnell``),
  a 16-channel VAE (0.3611 / 0.1159), a random CLIP of width 768 and a 1-layer T5 of width 4096.
  sd3 and flux sample with ``FlowMatchEuler`` (the other solvers are refused for flow models);
  their LoRA / ``parameters`` targets add the text stream's projections (the backbones'
  ``lora_target_modules``). Their builders are in benchmarks/_families.py; ``full`` is skipped
  unless ``--include-full-sd``. ``--count-params`` builds the denoisers on the meta device and
  prints their sizes without running anything (FLUX's 12B in fp32 is 48 GB).
* ``embedded``: the shipped digits model (``DigitsBackbone``, trained weights, unconditional)
  with the quickstart's classifier (log-probability of 7) as the objective.

``--tiny-sd`` builds sd15, pixart, sdxl, sd3 and flux at test size (tens of thousands of weights)
to check those code paths on a CPU in seconds; their timings then say nothing about the real models.

Targets: ``latent`` (x_T), ``parameters`` (the raw weights named above; tiny: all of them),
``lora`` (a rank-4 peft LoRA on the attention projections to_q, to_k, to_v, to_out.0; embedded:
on ``DigitsBackbone.lora_target_modules``, which adds conv1/conv2; ``--lora-modules`` overrides;
with the adapters folded into copies of the base weights for the no-grad calls, as ``RewardFineTuning(fold_adapters=True)``
does; the re-folding after each update is inside the timed region) and ``lora_plain`` (the same
adapters left as peft layers in every call). The no-grad sampling floor always runs with the
adapters disabled.

Memory: on CUDA ``peak_mib`` is ``torch.cuda.max_memory_allocated`` (absolute: weights included),
reset before each measurement. On CPU it is the growth of the process's peak resident set over
its resident set right before the measurement (benchmarks/_measure.py).

Examples::

    python benchmarks/gradient_cost.py                          # tiny, DDIM, 50 steps, CPU
    python benchmarks/gradient_cost.py --solvers DDIM DPMSolverPlusPlus LCMMultistep --json
    python benchmarks/gradient_cost.py --backbone embedded --targets latent lora --modes sdo full
    python benchmarks/gradient_cost.py --backbone sd15 pixart --tiny-sd --steps 2   # CPU smoke test
    python benchmarks/gradient_cost.py --backbone sdxl sd3 flux --tiny-sd --steps 5 --sd-latent-size 8
    python benchmarks/gradient_cost.py --backbone sdxl sd3 flux --count-params
    python benchmarks/gradient_cost.py --backbone sd15 pixart --steps 50   # on a GPU
    python benchmarks/gradient_cost.py --backbone sd15 --compile           # torch.compile'd denoiser
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

import torch

from _measure import MODES, TARGETS, Run, log, measure_row, timed_run
from _families import build
from _models import NATIVE_LATENT, add_adapters
from sdo_lightning.modules.base import check_solver_fits_backbone
from sdo_lightning.solvers import DDIM, DPMSolverPlusPlus, FlowMatchEuler, LCMMultistep

SOLVERS = {"DDIM": DDIM, "DPMSolverPlusPlus": DPMSolverPlusPlus, "LCMMultistep": LCMMultistep,
           "FlowMatchEuler": FlowMatchEuler}
#: the latent families whose plain full backprop needs --include-full-sd (tens of GB)
LARGE = ("sd15", "pixart", "sdxl", "sd3", "flux")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Wall time and peak memory of one gradient through diffusion sampling (forward "
            "sampling + decode + objective + backward) per backbone x solver x target x gradient "
            "mode, and their ratios to no-grad sampling of the same trajectory."
        ),
        epilog=(
            "Modes: sdo = ShortcutGradient(), full = FullBackprop(), full_ckpt = "
            "FullBackprop(checkpoint=True), truncated_k10/k1 = TruncatedBackprop(k=10/1) "
            "(weight targets only). peak_mib: CUDA max_memory_allocated (absolute); on CPU "
            "the growth of the peak resident set over the resident set before the run."
        ),
    )
    parser.add_argument(
        "--backbone",
        nargs="+",
        choices=["tiny", "embedded", "sd15", "pixart", "sdxl", "sd3", "flux"],
        default=None,
        help="backbones to run (default: tiny, plus sd15 and pixart when CUDA is available)",
    )
    parser.add_argument(
        "--solvers", nargs="+", choices=list(SOLVERS), default=["DDIM"],
        help="solvers (default: DDIM); flow backbones (sd3, flux) run FlowMatchEuler whatever is asked"
    )
    parser.add_argument(
        "--steps", type=int, default=50, help="network calls per trajectory (default 50; LCM uses min(steps, 8))"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=list(MODES), help="gradient modes (default: all)"
    )
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="targets (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine 2 OpenMP threads ran 10x slower)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--include-full-sd", action="store_true",
                        help="also run plain full backprop on sd15/pixart/sdxl/sd3/flux (tens of GB)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the denoiser (nn.Module.compile; first runs include compilation: use --warmup)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights for the denoiser")
    parser.add_argument(
        "--sd-latent-size",
        type=int,
        default=None,
        help="latent side of the latent families (default: native, "
        + ", ".join(f"{k} {v}" for k, v in NATIVE_LATENT.items()) + "; x8 = pixels); smaller only for smoke tests",
    )
    parser.add_argument("--guidance", type=float, default=7.5, help="sd15 CFG scale (default 7.5; pixart uses 4.5)")
    parser.add_argument("--tiny-sd", action="store_true",
                        help="sd15/pixart/sdxl/sd3/flux: test-sized pipelines (checks the code path on a CPU; "
                        "timings meaningless)")
    parser.add_argument("--sd3-variant", choices=["3-medium", "3.5-medium"], default="3-medium",
                        help="sd3: SD3-medium's transformer or SD3.5-medium's (MMDiT-X: dual attention 0-12, RMS qk norm)")
    parser.add_argument("--flux-variant", choices=["dev", "schnell"], default="dev",
                        help="flux: FLUX.1-dev (guidance embedding, dynamic shift) or FLUX.1-schnell")
    parser.add_argument("--count-params", action="store_true",
                        help="sdxl/sd3/flux: build the denoisers and VAEs on the meta device, print their "
                        "parameter counts and exit (no memory, no run)")
    parser.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME",
                        help="LoRA target modules (default: to_q to_k to_v to_out.0; embedded, sd3, flux: "
                        "their backbones' lora_target_modules)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a markdown table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def solvers_for(case: Any, names: list[str]) -> list[str]:
    """The asked solvers that fit the backbone (check_solver_fits_backbone); FlowMatchEuler for flow models."""
    if case.backbone.flow_matching and "FlowMatchEuler" not in names:
        log(f"[{case.name}] rectified-flow model: {' '.join(names)} refused, running FlowMatchEuler")
        names = ["FlowMatchEuler"]
    kept = []
    for name in names:
        try:
            check_solver_fits_backbone(SOLVERS[name](num_inference_steps=1), case.backbone)
            kept.append(name)
        except ValueError as err:
            log(f"[{case.name}] {name} skipped: {err}")
    return kept


def count_params(backbones: list[str], args: argparse.Namespace) -> int:
    """--count-params: the meta-device parameter counts of the sdxl/sd3/flux denoisers and VAEs."""
    from _families import FAMILIES, PUBLISHED, count_parameters, denoiser_config

    print("| backbone | denoiser | denoiser parameters | + buffers | published | VAE parameters |")
    print("|---|---|---|---|---|---|")
    for name in backbones:
        if name not in FAMILIES:
            log(f"--count-params: {name} skipped (sdxl, sd3 and flux only)")
            continue
        counts = count_parameters(name, args.tiny_sd, args.sd3_variant, args.flux_variant)
        variant = {"sd3": f" {args.sd3_variant}", "flux": f" {args.flux_variant}"}.get(name, "")
        cls = denoiser_config(name, args.tiny_sd, args.sd3_variant, args.flux_variant)[0].__name__
        n, with_buffers, n_vae = counts["denoiser"], counts["denoiser"] + counts["buffers"], counts["vae"]
        print(f"| {name}{variant}{' (tiny)' if args.tiny_sd else ''} | {cls} | {n:,} ({n / 1e9:.3f}B) | "
              f"{with_buffers / 1e9:.3f}B | {PUBLISHED[name]} | {n_vae:,} ({n_vae / 1e6:.1f}M) |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    backbones = args.backbone or (["tiny", "sd15", "pixart"] if device.type == "cuda" else ["tiny"])
    if args.count_params:
        return count_params(backbones, args)
    log(f"device: {device_name}, threads: {torch.get_num_threads()}, torch {torch.__version__}")

    rows: list[dict[str, Any]] = []
    wall_start = time.perf_counter()
    for bb_name in backbones:
        t0 = time.perf_counter()
        case = build(bb_name, device, args)  # --compile / --channels-last: the backbone's own options
        if any(t.startswith("lora") for t in args.targets):
            add_adapters(case, args.seed)
        log(f"[{bb_name}] built in {time.perf_counter() - t0:.1f}s; {len(case.trainable)} trainable tensors "
            f"({sum(p.numel() for p in case.trainable) / 1e6:.2f}M weights) for the parameters target")
        x_T = torch.randn(case.latent_shape, device=device, generator=torch.Generator(device).manual_seed(args.seed))
        for solver_name in solvers_for(case, args.solvers):
            steps = min(args.steps, 8) if solver_name == "LCMMultistep" else args.steps
            solver = SOLVERS[solver_name](num_inference_steps=steps)
            common = {"backbone": bb_name, "device": device_name, "solver": solver_name, "steps": steps,
                      "compile": args.compile, "channels_last": args.channels_last}

            log(f"[{bb_name} {solver_name} N={steps}]")
            for r in range(args.warmup):
                timed_run(case, solver, "sampling", "-", x_T, args.seed + r, warn=False)
            all_bases: list[Run] = []
            mode_rows: list[dict[str, Any]] = []
            jobs = [(t, m) for t in args.targets for m in args.modes if t in MODES[m][1]]
            if not jobs:  # sampling alone
                all_bases += [timed_run(case, solver, "sampling", "-", x_T, args.seed + r, warn=False)
                              for r in range(args.repeats)]
            for target, mode_name in jobs:
                if bb_name in LARGE and mode_name == "full" and not (args.include_full_sd or args.tiny_sd):
                    log(f"  {mode_name}/{target}: skipped on {bb_name} (pass --include-full-sd)")
                    continue
                runs, bases = measure_row(case, solver, mode_name, target, x_T, args)
                all_bases += bases
                s = statistics.median(r.seconds for r in runs)
                ratio = statistics.median(r.seconds / b.seconds for r, b in zip(runs, bases))
                cpu_ratio = statistics.median(r.cpu_seconds / b.cpu_seconds for r, b in zip(runs, bases))
                mib = max(r.peak_mib for r in runs)
                log(f"  {mode_name}/{target}: {s:.3f}s, {ratio:.2f}x paired sampling "
                    f"(cpu-time {cpu_ratio:.2f}x), {mib:.1f} MiB")
                mode_rows.append({**common, "target": target, "mode": mode_name, "seconds": s,
                                  "cpu_seconds": statistics.median(r.cpu_seconds for r in runs),
                                  "peak_mib": mib, "ratio_to_sampling": ratio, "cpu_ratio_to_sampling": cpu_ratio,
                                  "memory_method": runs[0].method})
            base_mib = max(b.peak_mib for b in all_bases)
            base_s = statistics.median(b.seconds for b in all_bases)
            log(f"  sampling: {base_s:.3f}s (median of {len(all_bases)}), {base_mib:.1f} MiB")
            rows.append({**common, "target": "-", "mode": "sampling", "seconds": base_s,
                         "cpu_seconds": statistics.median(b.cpu_seconds for b in all_bases), "peak_mib": base_mib,
                         "ratio_to_sampling": 1.0, "cpu_ratio_to_sampling": 1.0,
                         "memory_method": all_bases[0].method})
            for row in [rows[-1], *mode_rows]:
                row["memory_ratio"] = row["peak_mib"] / base_mib if base_mib > 0 else None
            rows += mode_rows
        del case
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log(f"total {time.perf_counter() - wall_start:.1f}s")

    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["backbone", "solver", "steps", "target", "mode", "seconds", "ratio_to_sampling", "peak_mib", "memory_ratio"]
    print(f"device: {device_name}; threads: {torch.get_num_threads()}; seconds: median of {args.repeats} runs; "
          "ratio_to_sampling: median of the ratios to a no-grad sampling run right before each run; "
          f"peak_mib: {rows[0]['memory_method'] if rows else '-'}"
          + (" (growth over the RSS before each run)" if device.type == "cpu" else " (absolute)"))
    print()
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [
            r["backbone"], r["solver"], str(r["steps"]), r["target"], r["mode"], fmt(r["seconds"], 3),
            fmt(r["ratio_to_sampling"], 2), fmt(r["peak_mib"], 1), fmt(r["memory_ratio"], 2),
        ]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
