"""Timing and peak memory of one gradient (or one no-grad sampling) for benchmarks/gradient_cost.py.

Memory: on CUDA ``peak_mib`` is ``torch.cuda.max_memory_allocated`` (absolute: weights included),
reset before each measurement. On CPU it is the growth of the process's peak resident set over
its resident set right before the measurement (VmHWM after resetting it through
/proc/self/clear_refs where the kernel allows it, else VmRSS polled every 5 ms).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from _models import Case, set_adapters
from sdo_lightning import Target, sample
from sdo_lightning.gradient_modes import FullBackprop, ShortcutGradient, TruncatedBackprop

_ALL = ("latent", "parameters", "lora", "lora_plain")
WEIGHTS = ("parameters", "lora", "lora_plain")
#: name -> (factory, targets it applies to)
MODES: dict[str, tuple[Callable[[], Any], tuple[str, ...]]] = {
    "sdo": (lambda: ShortcutGradient(), _ALL),
    "full": (lambda: FullBackprop(), _ALL),
    "full_ckpt": (lambda: FullBackprop(checkpoint=True), _ALL),
    "truncated_k10": (lambda: TruncatedBackprop(k=10), WEIGHTS),
    "truncated_k1": (lambda: TruncatedBackprop(k=1), WEIGHTS),
}
TARGETS = _ALL


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def trained(case: Case, target: str) -> list[nn.Parameter]:
    """The tensors a weights target differentiates."""
    return case.lora_params if target.startswith("lora") else case.trainable


def one_run(case: Case, solver: Any, mode_name: str, target: str, x_T: Tensor, seed: int) -> Tensor | None:
    """One no-grad sampling (mode 'sampling') or one gradient; returns the gradient's norm."""
    device = x_T.device
    generator = torch.Generator(device).manual_seed(seed)
    plan_generator = torch.Generator().manual_seed(seed)
    config = case.backbone.scheduler_config
    if mode_name == "sampling":
        with torch.no_grad():
            x0 = sample(case.backbone.denoise, solver, x_T, case.cond, generator=generator, scheduler_config=config)
            case.objective(x0)
        return None
    mode = MODES[mode_name][0]()
    x = x_T.clone().requires_grad_(target == "latent")
    tgt = Target.latent() if target == "latent" else Target.parameters()
    denoiser = case.backbone.denoise
    if target == "lora":
        set_adapters(case, "folded")  # re-fold after the (notional) last update: part of a step's cost
        folding, plain = case.folding, case.backbone.denoise

        def denoiser(x: Tensor, t: Tensor, cond: Any) -> Tensor:
            folding.fold(not torch.is_grad_enabled())  # the kept call runs through the adapters
            return plain(x, t, cond)

    x0 = sample(denoiser, solver, x, case.cond, gradient_mode=mode, target=tgt, generator=generator,
                plan_generator=plan_generator, scheduler_config=config)
    if case.folding is not None:
        case.folding.fold(False)
    loss = case.objective(x0)
    loss.backward()
    if target == "latent":
        return x.grad.detach().float().norm()
    return torch.stack([p.grad.float().norm() for p in trained(case, target) if p.grad is not None]).norm()


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    peak_mib: float
    method: str


def timed_run(case: Case, solver: Any, mode_name: str, target: str, x_T: Tensor, seed: int, warn: bool) -> Run:
    """One timed run with fresh gradients; ``target`` sets which tensors require grad."""
    device = x_T.device
    for p in case.network.parameters():
        p.requires_grad_(False)
        p.grad = None
    if target in WEIGHTS and mode_name != "sampling":
        for p in trained(case, target):
            p.requires_grad_(True)
    set_adapters(case, "plain" if target.startswith("lora") else "off")
    with PeakMemory(device) as mem:
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        gnorm = one_run(case, solver, mode_name, target, x_T, seed)
        sync(device)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    set_adapters(case, "off")
    if warn and gnorm is not None and not (torch.isfinite(gnorm) and gnorm > 0):
        log(f"  WARNING: {mode_name}/{target}: gradient norm is {float(gnorm)}")
    for p in [*case.network.parameters(), *(case.lora_params or [])]:
        p.requires_grad_(False)
        p.grad = None
    return Run(elapsed, cpu, mem.mib, mem.method)


def measure_row(
    case: Case, solver: Any, mode_name: str, target: str, x_T: Tensor, args: argparse.Namespace
) -> tuple[list[Run], list[Run]]:
    """``args.warmup`` untimed runs, then ``args.repeats`` pairs (no-grad sampling, this mode).

    Pairing each gradient run with a sampling run right before it keeps the ratio honest on a
    machine whose speed drifts (other jobs on shared cores). Returns (mode runs, sampling runs).
    """
    for r in range(args.warmup):
        timed_run(case, solver, mode_name, target, x_T, args.seed + r, warn=True)
    runs, bases = [], []
    for r in range(args.repeats):
        bases.append(timed_run(case, solver, "sampling", "-", x_T, args.seed + r, warn=False))
        runs.append(timed_run(case, solver, mode_name, target, x_T, args.seed + r, warn=False))
    return runs, bases
