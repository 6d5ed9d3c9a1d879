"""Seconds per optimizer step of the quickstart by OpenMP wait policy, idle and beside busy processes.

    python benchmarks/cpu_threads.py [--steps 6] [--busy 0 2] [--policies default PASSIVE]

Each cell runs `configs/quickstart.yaml` in a fresh process for ``--steps`` optimizer steps with
the given ``OMP_WAIT_POLICY`` ("default": unset, the behaviour before ``sdo`` set it) and torch's
default thread count, while ``busy`` other processes spin on the CPU (pure-Python loops, as other
jobs on a shared machine), and reports the median wall and CPU seconds of the steps after the
first (the first includes one-off warm-up). Run it on an otherwise quiet machine: the "busy"
processes are the only load it means to measure. Prints a markdown table (or JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_INNER = r"""
import json, sys, time
from lightning.pytorch import Callback
from sdo_lightning.cli import main

class StepTimer(Callback):
    def __init__(self):
        self.rows = []
    def on_train_batch_start(self, *args):
        self.start = (time.perf_counter(), time.process_time())
    def on_train_batch_end(self, *args):
        self.rows.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))

config, steps, out = sys.argv[1], sys.argv[2], sys.argv[3]
cli = main(["--config", config, "--trainer.max_steps", steps, "--trainer.logger", "false",
            "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"], run=False)
timer = StepTimer()
cli.trainer.callbacks.append(timer)
cli.trainer.fit(cli.model, cli.datamodule)
import torch
print(json.dumps({"steps": timer.rows, "threads": torch.get_num_threads()}))
"""


def one_cell(config: str, steps: int, policy: str, busy: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            run = subprocess.run([sys.executable, "-c", _INNER, config, str(steps), scratch], env=env, cwd=scratch,
                                 capture_output=True, text=True, check=True)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    result = json.loads(run.stdout.strip().splitlines()[-1])
    later = result["steps"][1:] or result["steps"]
    return {"policy": policy, "busy": busy, "threads": result["threads"],
            "first_step_s": round(result["steps"][0][0], 2),
            "wall_s_per_step": round(statistics.median(w for w, _ in later), 3),
            "cpu_s_per_step": round(statistics.median(c for _, c in later), 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--policies", nargs="+", default=["default", "PASSIVE"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [one_cell(args.config, args.steps, policy, busy) for busy in args.busy for policy in args.policies]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("| OMP_WAIT_POLICY | busy processes | torch threads | first step (s) | wall s / step | CPU s / step |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['policy']} | {r['busy']} | {r['threads']} | {r['first_step_s']} | {r['wall_s_per_step']} "
                  f"| {r['cpu_s_per_step']} |")
    return rows


if __name__ == "__main__":
    main()
