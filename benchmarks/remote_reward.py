"""The cost of a reward served by `sdo serve-reward` against the same reward in-process.

    python benchmarks/remote_reward.py [--steps 6] [--samples 16]

Runs the quickstart (`configs/quickstart.yaml`: SDO on the digits DDPM, 50 DDIM steps, the
classifier averaged over 16 augmented copies plus an L2 fidelity term) for ``--steps`` optimizer
steps twice: with the classifier in this process, and with the classifier served by
`sdo serve-reward` in a subprocess and reached through `RemoteObjective` (the fidelity term stays
local); then the same on a tiny random Stable Diffusion pipeline with a tiny CLIP score. Reports the median wall seconds per step after the first, the CPU seconds per step of
this process and of the server (from /proc), and the ratio served / in-process. One torch thread
on each side; run it on a quiet machine (it times wall clock). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sdo_lightning.console import configure_cpu_threads

configure_cpu_threads()

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIER = ["--objective", "ClassifierObjective", "--objective.target_class", "7", "--objective.augment", "16",
              "--objective.noise_std", "0.2"]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StepTimer(Callback):
    def __init__(self, server_pid: int | None) -> None:
        self.server_pid, self.rows = server_pid, []

    def _now(self) -> tuple[float, float, float]:
        server = _cpu_seconds(self.server_pid) if self.server_pid else 0.0
        return time.perf_counter(), time.process_time(), server

    def on_train_batch_start(self, *args) -> None:
        self.start = self._now()

    def on_train_batch_end(self, *args) -> None:
        self.rows.append(tuple(b - a for a, b in zip(self.start, self._now())))


def serve(objective_args: list[str]) -> tuple[subprocess.Popen, str]:
    """``sdo serve-reward`` with ``objective_args`` in a subprocess on a free port: (process, address)."""
    server = subprocess.Popen([sys.executable, "-m", "sdo_lightning", "serve-reward", *objective_args,
                               "--address", "127.0.0.1:0", "--threads", "1"], stderr=subprocess.PIPE, text=True)
    return server, next(line for line in server.stderr if "serving" in line).split(" on ")[1].split()[0]


def timed_fit(module: Any, data: Any, steps: int, server: subprocess.Popen | None) -> dict[str, float]:
    """Fit ``steps`` steps (results written to a scratch folder), stop the server; the medians of the
    steps after the first."""
    timer = StepTimer(server.pid if server else None)
    try:
        with tempfile.TemporaryDirectory() as scratch:  # the run's results (before_after.png, ...) go there
            trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                              enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                              default_root_dir=scratch)
            trainer.fit(module, datamodule=data)
    finally:
        if server is not None:
            server.kill()
            server.wait()
    later = timer.rows[1:]
    return {"wall": statistics.median(r[0] for r in later), "cpu": statistics.median(r[1] for r in later),
            "server_cpu": statistics.median(r[2] for r in later)}


def run(served: bool, steps: int, samples: int) -> dict[str, float]:
    from _models import cli_parts

    from sdo_lightning.objectives import RemoteObjective

    module, data = cli_parts(["--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.num_samples", str(samples)])
    server = None
    if served:
        server, address = serve(CLASSIFIER)
        module.objective.objectives[0] = RemoteObjective(address)
    return timed_fit(module, data, steps, server)


def run_tiny_sd(served: bool, steps: int, samples: int, root: Path) -> dict[str, float]:
    """The same on a tiny random Stable Diffusion pipeline (20 DDIM steps) with a tiny CLIP score."""
    from sdo_lightning.backbones import StableDiffusionBackbone
    from sdo_lightning.modules.latent_optimization import LatentOptimization
    from sdo_lightning.objectives import CLIPScore, RemoteObjective
    from sdo_lightning.solvers import DDIM
    from sdo_lightning.testing import tiny_models
    from sdo_lightning.training.data import SampleSet

    if not (root / "sd").is_dir():
        tiny_models.build_tiny_sd(root / "sd")
        tiny_models.build_tiny_clip(root / "clip")
    server = None
    objective: Any = CLIPScore(str(root / "clip"), prompt="a cat")
    if served:
        server, address = serve(["--objective", "CLIPScore", "--objective.model", str(root / "clip"),
                                 "--objective.prompt", "a cat"])
        objective = RemoteObjective(address)
    module = LatentOptimization(objective=objective, backbone=StableDiffusionBackbone(str(root / "sd"), guidance_scale=1.0),
                                solver=DDIM(20), lr=0.1)
    return timed_fit(module, SampleSet(num_samples=samples, prompt="a cat"), steps, server)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | reward | wall s / step | CPU s / step (run) | CPU s / step (server) | served / in-process, wall |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        cases = [("digits quickstart, classifier x16 augmented", lambda served: run(served, args.steps, args.samples)),
                 ("tiny SD (20 DDIM steps), tiny CLIP score",
                  lambda served: run_tiny_sd(served, args.steps, min(args.samples, 4), Path(scratch)))]
        for name, fn in cases:
            local, remote = fn(False), fn(True)
            for how, r in (("in-process", local), ("served", remote)):
                ratio = f"{remote['wall'] / local['wall']:.3f}" if how == "served" else "-"
                print(f"| {name} | {how} | {r['wall']:.3f} | {r['cpu']:.3f} | {r['server_cpu']:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
