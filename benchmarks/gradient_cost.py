"""Cost of one gradient through diffusion sampling, per gradient mode, relative to no-grad sampling.

For each backbone x solver x target x gradient mode this measures the wall time and the peak
memory of ONE gradient (forward sampling through :func:`sdo_lightning.sample`, the VAE decode
if the backbone has one, a scalar objective, ``backward()``) and of no-grad sampling (same
trajectory, decode and objective under ``torch.no_grad()``), and prints the ratios.

Backbones (random weights, nothing is downloaded):

* ``tiny``: a small ``diffusers.UNet2DModel`` (3x16x16, block_out_channels (32, 64), one
  attention block), no decoder; objective = mean(x_0 * fixed random weights).
* ``sd15``: an SD-1.5-sized ``UNet2DConditionModel`` + ``AutoencoderKL`` (bf16 on CUDA, fp32 on
  CPU), random text embeddings (1, 77, 768) with classifier-free guidance (UNet batch 2,
  guidance 7.5), decode of ``latents / 0.18215`` inside the timed region; objective =
  mean(image * fixed random weights). The ``parameters`` target trains only the attention
  projections (to_q, to_k, to_v, to_out.0). ``full`` is skipped unless ``--include-full-sd``.
* ``pixart``: a PixArt-alpha-XL-2-512-sized ``PixArtTransformer2DModel`` (28 blocks, width 1152,
  learned sigma: the epsilon half is used) + the same ``AutoencoderKL``, random T5-shaped text
  embeddings (1, 120, 4096) with classifier-free guidance (batch 2, guidance 4.5); bf16 on CUDA.
  ``full`` is skipped unless ``--include-full-sd``.
* ``embedded``: the shipped digits model (``DigitsBackbone``, trained weights, unconditional)
  with the quickstart's classifier (log-probability of 7) as the objective.

Targets: ``latent`` (x_T), ``parameters`` (the raw weights named above), ``lora`` (a rank-4 peft
LoRA on the backbone's LoRA target modules, with the adapters folded into copies of the base
weights for the no-grad calls, as ``RewardFineTuning(fold_adapters=True)`` does; the re-folding
after each update is inside the timed region) and ``lora_plain`` (the same adapters left as peft
layers in every call). The no-grad sampling floor always runs with the adapters disabled.

Memory: on CUDA ``peak_mib`` is ``torch.cuda.max_memory_allocated`` (absolute: weights included),
reset before each measurement. On CPU it is the growth of the process's peak resident set over
its resident set right before the measurement (VmHWM after resetting it through
/proc/self/clear_refs where the kernel allows it, else VmRSS polled every 5 ms).

Examples::

    python benchmarks/gradient_cost.py                          # tiny, DDIM, 50 steps, CPU
    python benchmarks/gradient_cost.py --solvers DDIM DPMSolverPlusPlus LCMMultistep --json
    python benchmarks/gradient_cost.py --backbone embedded --targets latent lora --modes sdo full
    python benchmarks/gradient_cost.py --backbone sd15 pixart --steps 50   # on a GPU
    python benchmarks/gradient_cost.py --backbone sd15 --compile           # torch.compile'd denoiser
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from sdo_lightning import Target, sample
from sdo_lightning.gradient_modes import FullBackprop, ShortcutGradient, TruncatedBackprop
from sdo_lightning.solvers import DDIM, DPMSolverPlusPlus, LCMMultistep

SOLVERS = {"DDIM": DDIM, "DPMSolverPlusPlus": DPMSolverPlusPlus, "LCMMultistep": LCMMultistep}
#: name -> (factory, targets it applies to)
_ALL = ("latent", "parameters", "lora", "lora_plain")
_WEIGHTS = ("parameters", "lora", "lora_plain")
MODES: dict[str, tuple[Callable[[], Any], tuple[str, ...]]] = {
    "sdo": (lambda: ShortcutGradient(), _ALL),
    "full": (lambda: FullBackprop(), _ALL),
    "full_ckpt": (lambda: FullBackprop(checkpoint=True), _ALL),
    "truncated_k10": (lambda: TruncatedBackprop(k=10), _WEIGHTS),
    "truncated_k1": (lambda: TruncatedBackprop(k=1), _WEIGHTS),
}
TARGETS = _ALL
LORA_RANK = 4

# SD-1.5's published scheduler config (the solvers take what they need from it).
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
TINY_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# backbones
# ----------------------------------------------------------------------------------------------
@dataclass
class Backbone:
    name: str
    unet: nn.Module
    denoiser: Callable[[Tensor, Tensor, Any], Tensor]
    cond: Any
    latent_shape: tuple[int, ...]
    scheduler_config: dict[str, Any]
    #: latents x_0 -> scalar objective (decode included)
    objective: Callable[[Tensor], Tensor]
    #: the weights a ``parameters`` target trains
    trainable: list[nn.Parameter]
    #: layer names a ``lora`` target adapts (peft ``target_modules``)
    lora_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    #: the LoRA adapters (set by :func:`add_adapters`)
    lora_params: list[nn.Parameter] | None = None
    folding: Any = None


def build_tiny(device: torch.device, seed: int) -> Backbone:
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).to(device).eval()
    shape = (1, 3, 16, 16)
    weights = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(seed + 1))

    def denoiser(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        return unet(x, t).sample

    def objective(x0: Tensor) -> Tensor:
        return (x0 * weights).mean()

    return Backbone("tiny", unet, denoiser, None, shape, TINY_SCHEDULER, objective, list(unet.parameters()))


def build_embedded(device: torch.device, seed: int) -> Backbone:
    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.objectives import ClassifierObjective

    backbone = DigitsBackbone().to(device)
    classifier = ClassifierObjective(target_class=7).to(device)
    cond = torch.full((1,), DigitsBackbone.NULL_CLASS, dtype=torch.long, device=device)

    def objective(x0: Tensor) -> Tensor:
        return classifier(backbone.decode(x0), {}).sum()

    modules = tuple(DigitsBackbone.lora_target_modules)
    trainable = [p for name, p in backbone.unet.named_parameters()
                 if name.endswith(tuple(f"{m}.weight" for m in modules))]
    return Backbone("embedded", backbone.unet, backbone.denoise, cond, (1, *backbone.latent_shape),
                    backbone.scheduler_config, objective, trainable, modules)


def _sd_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )


def _attention_weights(network: nn.Module) -> list[nn.Parameter]:
    return [
        p
        for name, p in network.named_parameters()
        if (".attn1." in name or ".attn2." in name)
        and name.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))
    ]


def build_pixart(device: torch.device, seed: int, latent_size: int, guidance: float) -> Backbone:
    from diffusers import PixArtTransformer2DModel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    # PixArt-XL-2-512x512's transformer config (learned sigma: 8 output channels).
    net = PixArtTransformer2DModel(
        sample_size=64, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
        out_channels=8, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
        norm_type="ada_norm_single", use_additional_conditions=False,
    )
    vae = _sd_vae()
    net = nn.Module.to(net, device=device, dtype=dtype).eval()
    vae = nn.Module.to(vae, device=device, dtype=dtype).eval().requires_grad_(False)
    gen = torch.Generator(device).manual_seed(seed + 1)
    text = torch.randn(2, 120, 4096, device=device, generator=gen).to(dtype)  # [uncond, cond]
    mask = torch.ones(2, 120, device=device)
    shape = (1, 4, latent_size, latent_size)
    weights = torch.randn(1, 3, latent_size * 8, latent_size * 8, device=device, generator=gen)

    def denoiser(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        x_in = torch.cat([x, x]).to(dtype)
        out = net(x_in, encoder_hidden_states=cond, timestep=t.expand(2).to(device), encoder_attention_mask=mask,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        eps = out[:, :4].to(x.dtype)  # the other half is the learned variance
        uncond, text_out = eps.chunk(2)
        return uncond + guidance * (text_out - uncond)

    def objective(latents: Tensor) -> Tensor:
        image = vae.decode((latents / 0.18215).to(dtype)).sample
        return (image.float() * weights).mean()

    scheduler = {**SD_SCHEDULER, "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001}
    return Backbone("pixart", net, denoiser, text, shape, scheduler, objective, _attention_weights(net))


def add_adapters(bb: Backbone, seed: int) -> None:
    """A rank-4 LoRA on ``bb.lora_modules`` with small random B (so the adapters act), folding ready."""
    from sdo_lightning.lora import AdapterFolding, add_lora

    bb.lora_params = add_lora(bb.unet, LORA_RANK, LORA_RANK, list(bb.lora_modules))
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in bb.lora_params:
            p.copy_(0.01 * torch.randn(p.shape, generator=gen))
    bb.folding = AdapterFolding(bb.unet)
    set_adapters(bb, "off")


def set_adapters(bb: Backbone, state: str) -> None:
    """``off``: base model only (the floor); ``plain``: peft layers in every call; ``folded``:
    adapters folded into weight copies for no-grad calls (after a refresh)."""
    if bb.folding is None:
        return
    bb.folding.fold(False)
    for layer in bb.folding.layers:
        layer._disable_adapters = state == "off"
    if state == "folded":
        bb.folding.refresh()


def build_sd15(device: torch.device, seed: int, latent_size: int, guidance: float) -> Backbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _sd_vae()
    # nn.Module.to: diffusers' own .to(dtype) warns about from_pretrained, which is not used here
    unet = nn.Module.to(unet, device=device, dtype=dtype).eval()
    vae = nn.Module.to(vae, device=device, dtype=dtype).eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device).manual_seed(seed + 1)
    text = torch.randn(1, 77, 768, device=device, generator=gen, dtype=torch.float32)
    uncond = torch.randn(1, 77, 768, device=device, generator=gen, dtype=torch.float32)
    cond = torch.cat([uncond, text]).to(dtype)
    shape = (1, 4, latent_size, latent_size)
    image_size = latent_size * 8
    weights = torch.randn(1, 3, image_size, image_size, device=device, generator=gen)

    def denoiser(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        # classifier-free guidance: one UNet call on [uncond, cond]
        x_in = torch.cat([x, x]).to(dtype)
        out = unet(x_in, t, encoder_hidden_states=cond).sample.to(x.dtype)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    def objective(latents: Tensor) -> Tensor:
        image = vae.decode((latents / 0.18215).to(dtype)).sample
        return (image.float() * weights).mean()

    return Backbone("sd15", unet, denoiser, cond, shape, SD_SCHEDULER, objective, _attention_weights(unet))


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


_libc: Any = None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS so the RSS before a measurement is a fair base."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of the enclosed block, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib = float("nan")
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda.max_memory_allocated"
            return self
        _malloc_trim()
        self.base = _status_kib("VmRSS")
        self.use_hwm = _reset_hwm()
        self.method = "VmHWM" if self.use_hwm else "VmRSS polling"
        self.polled = self.base
        self._stop = threading.Event()
        if not self.use_hwm:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.polled = max(self.polled, _status_kib("VmRSS"))
            self._stop.wait(0.005)

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        if self.use_hwm:
            peak = _status_kib("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self.polled, _status_kib("VmRSS"))
        self.mib = max(peak - self.base, 0) / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_run(bb: Backbone, solver: Any, mode_name: str, target: str, x_T: Tensor, seed: int) -> Tensor | None:
    """One no-grad sampling (mode 'sampling') or one gradient; returns the gradient's norm."""
    device = x_T.device
    generator = torch.Generator(device).manual_seed(seed)
    plan_generator = torch.Generator().manual_seed(seed)
    if mode_name == "sampling":
        with torch.no_grad():
            x0 = sample(bb.denoiser, solver, x_T, bb.cond, generator=generator, scheduler_config=bb.scheduler_config)
            bb.objective(x0)
        return None
    mode = MODES[mode_name][0]()
    x = x_T.clone().requires_grad_(target == "latent")
    tgt = Target.latent() if target == "latent" else Target.parameters()
    denoiser = bb.denoiser
    if target == "lora":
        set_adapters(bb, "folded")  # re-fold after the (notional) last update: part of a step's cost
        folding, plain = bb.folding, bb.denoiser

        def denoiser(x: Tensor, t: Tensor, cond: Any) -> Tensor:
            folding.fold(not torch.is_grad_enabled())  # the kept call runs through the adapters
            return plain(x, t, cond)

    x0 = sample(
        denoiser,
        solver,
        x,
        bb.cond,
        gradient_mode=mode,
        target=tgt,
        generator=generator,
        plan_generator=plan_generator,
        scheduler_config=bb.scheduler_config,
    )
    if bb.folding is not None:
        bb.folding.fold(False)
    loss = bb.objective(x0)
    loss.backward()
    if target == "latent":
        return x.grad.detach().float().norm()
    return torch.stack([p.grad.float().norm() for p in trained(bb, target) if p.grad is not None]).norm()


def trained(bb: Backbone, target: str) -> list[nn.Parameter]:
    """The tensors a weights target differentiates."""
    return bb.lora_params if target.startswith("lora") else bb.trainable


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    peak_mib: float
    method: str


def timed_run(bb: Backbone, solver: Any, mode_name: str, target: str, x_T: Tensor, seed: int, warn: bool) -> Run:
    """One timed run with fresh gradients; ``target`` sets which tensors require grad."""
    device = x_T.device
    for p in bb.unet.parameters():
        p.requires_grad_(False)
        p.grad = None
    if target in _WEIGHTS and mode_name != "sampling":
        for p in trained(bb, target):
            p.requires_grad_(True)
    set_adapters(bb, "plain" if target.startswith("lora") else "off")
    with PeakMemory(device) as mem:
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        gnorm = one_run(bb, solver, mode_name, target, x_T, seed)
        sync(device)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    set_adapters(bb, "off")
    if warn and gnorm is not None and not (torch.isfinite(gnorm) and gnorm > 0):
        log(f"  WARNING: {mode_name}/{target}: gradient norm is {float(gnorm)}")
    for p in [*bb.unet.parameters(), *(bb.lora_params or [])]:
        p.requires_grad_(False)
        p.grad = None
    return Run(elapsed, cpu, mem.mib, mem.method)


def measure_row(
    bb: Backbone, solver: Any, mode_name: str, target: str, x_T: Tensor, args: argparse.Namespace
) -> tuple[list[Run], list[Run]]:
    """``args.warmup`` untimed runs, then ``args.repeats`` pairs (no-grad sampling, this mode).

    Pairing each gradient run with a sampling run right before it keeps the ratio honest on a
    machine whose speed drifts (other jobs on shared cores). Returns (mode runs, sampling runs).
    """
    for r in range(args.warmup):
        timed_run(bb, solver, mode_name, target, x_T, args.seed + r, warn=True)
    runs, bases = [], []
    for r in range(args.repeats):
        bases.append(timed_run(bb, solver, "sampling", "-", x_T, args.seed + r, warn=False))
        runs.append(timed_run(bb, solver, mode_name, target, x_T, args.seed + r, warn=False))
    return runs, bases


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
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
            "(parameters target only). peak_mib: CUDA max_memory_allocated (absolute); on CPU "
            "the growth of the peak resident set over the resident set before the run."
        ),
    )
    parser.add_argument(
        "--backbone",
        nargs="+",
        choices=["tiny", "embedded", "sd15", "pixart"],
        default=None,
        help="backbones to run (default: tiny, plus sd15 and pixart when CUDA is available)",
    )
    parser.add_argument(
        "--solvers", nargs="+", choices=list(SOLVERS), default=["DDIM"], help="solvers (default: DDIM)"
    )
    parser.add_argument(
        "--steps", type=int, default=50, help="network calls per trajectory (default 50; LCM uses min(steps, 8))"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=list(MODES), help="gradient modes (default: all)"
    )
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="targets (default: both)")
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
                        help="also run plain full backprop on sd15/pixart (tens of GB)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the denoiser (nn.Module.compile; first runs include compilation: use --warmup)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last weights for the denoiser")
    parser.add_argument(
        "--sd-latent-size",
        type=int,
        default=64,
        help="sd15/pixart latent side (default 64 = 512 px images); smaller only for smoke tests",
    )
    parser.add_argument("--guidance", type=float, default=7.5, help="sd15 CFG scale (default 7.5; pixart uses 4.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a markdown table")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    backbones = args.backbone or (["tiny", "sd15", "pixart"] if device.type == "cuda" else ["tiny"])
    log(f"device: {device_name}, threads: {torch.get_num_threads()}, torch {torch.__version__}")

    rows: list[dict[str, Any]] = []
    wall_start = time.perf_counter()
    for bb_name in backbones:
        t0 = time.perf_counter()
        if bb_name == "tiny":
            bb = build_tiny(device, args.seed)
        elif bb_name == "embedded":
            bb = build_embedded(device, args.seed)
        elif bb_name == "pixart":
            bb = build_pixart(device, args.seed, args.sd_latent_size, 4.5)
        else:
            bb = build_sd15(device, args.seed, args.sd_latent_size, args.guidance)
        if any(t.startswith("lora") for t in args.targets):
            add_adapters(bb, args.seed)
        if args.channels_last or args.compile:
            from sdo_lightning.backbones.base import speed_up as _speed_up

            _speed_up(bb.unet, args.compile, args.channels_last)
        log(f"[{bb_name}] built in {time.perf_counter() - t0:.1f}s; {len(bb.trainable)} trainable tensors "
            f"({sum(p.numel() for p in bb.trainable) / 1e6:.2f}M weights) for the parameters target")
        x_T = torch.randn(bb.latent_shape, device=device, generator=torch.Generator(device).manual_seed(args.seed))
        for solver_name in args.solvers:
            steps = min(args.steps, 8) if solver_name == "LCMMultistep" else args.steps
            solver = SOLVERS[solver_name](num_inference_steps=steps)
            common = {"backbone": bb_name, "device": device_name, "solver": solver_name, "steps": steps,
                      "compile": args.compile, "channels_last": args.channels_last}

            log(f"[{bb_name} {solver_name} N={steps}]")
            for r in range(args.warmup):
                timed_run(bb, solver, "sampling", "-", x_T, args.seed + r, warn=False)
            all_bases: list[Run] = []
            mode_rows: list[dict[str, Any]] = []
            jobs = [(t, m) for t in args.targets for m in args.modes if t in MODES[m][1]]
            if not jobs:  # sampling alone
                all_bases += [timed_run(bb, solver, "sampling", "-", x_T, args.seed + r, warn=False)
                              for r in range(args.repeats)]
            for target, mode_name in jobs:
                if bb_name in ("sd15", "pixart") and mode_name == "full" and not args.include_full_sd:
                    log(f"  {mode_name}/{target}: skipped on sd15 (pass --include-full-sd)")
                    continue
                runs, bases = measure_row(bb, solver, mode_name, target, x_T, args)
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
        del bb
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
