"""Memory of one SDO step per checkpointing option at the decode and reward boundary (CPU).

    python benchmarks/_memory.py [--family tiny sd15] [--latent-size 16] [--steps 2]

One SDO step w.r.t. x_T: DDIM sampling with the first call kept, the VAE decode, a CLIP score,
backward. Options: none; ``kept_call`` (``ShortcutGradient(checkpoint=True)``); ``decode`` (the
backbone's ``checkpoint_decode``); ``objective`` (``Checkpointed(CLIPScore)``); ``all`` three.
Families: ``tiny`` (sdo_lightning/testing/tiny_models.py's SD pipeline and CLIP) and ``sd15`` (the SD-1.5 UNet
and VAE from their published configs with random weights, benchmarks/_models.py, and a CLIP
ViT-L/14-sized vision tower with random weights), at a small latent size on this CPU.

Each option runs in a fresh process and reports two numbers:

* ``saved_MiB``: the bytes of the tensors autograd holds for backward at the end of the forward
  pass (each storage counted once; the weights, held anyway, left out), recorded with ``torch.autograd.graph.saved_tensors_hooks``.
  A checkpointed region keeps its tensors under its own hooks (the innermost ones apply), so it
  counts only what it really holds. This is the memory the options act on, and on a GPU it is
  the bulk of the peak above the weights; it does not include the recomputed activations of one
  checkpointed region during backward.
* ``peak_rss_MiB``: the process's resident memory above its level before the step, sampled every
  2 ms during forward and backward (torch has no allocator counter on CPU): includes backward's
  recomputation and the CPU allocator's caching, so it is coarser.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ["none", "kept_call", "decode", "objective", "all"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """The highest resident set size seen while active, sampled by a thread."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


class SavedBytes:
    """Bytes of the tensors saved for backward inside the block, each storage once, leaving out
    the storages of ``modules``' parameters and buffers (held anyway)."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.weights = {t.untyped_storage().data_ptr() for m in modules for t in (*m.parameters(), *m.buffers())}

    def __enter__(self) -> "SavedBytes":
        self.storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.weights:
                self.storages[storage.data_ptr()] = storage.nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def _large_clip(root: Path) -> Path:
    """A CLIPModel with CLIP ViT-L/14's vision tower (24 layers, width 1024, 224 px) and a
    one-layer text tower, random weights, with the tests' tiny tokenizer."""
    from sdo_lightning.testing.tiny_models import build_tiny_tokenizer
    from transformers import CLIPConfig, CLIPModel

    tokenizer, vocab = build_tiny_tokenizer(root)
    config = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=1,
                         vocab_size=vocab, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           image_size=224, patch_size=14),
        projection_dim=768,
    )
    CLIPModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def child(family: str, option: str, latent_size: int, steps: int) -> dict:
    from sdo_lightning import sample
    from sdo_lightning.backbones import StableDiffusionBackbone
    from sdo_lightning.gradient_modes import ShortcutGradient
    from sdo_lightning.objectives import CLIPScore
    from sdo_lightning.objectives.checkpointed import Checkpointed
    from sdo_lightning.solvers import DDIM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if family == "tiny":
            from sdo_lightning.testing.tiny_models import build_tiny_clip, build_tiny_sd

            backbone = StableDiffusionBackbone(str(build_tiny_sd(Path(tmp) / "sd")), guidance_scale=7.5)
            objective = CLIPScore(str(build_tiny_clip(Path(tmp) / "clip")), prompt="a cat")
        else:
            from _models import build_sd15

            backbone = build_sd15(torch.device("cpu"), 0, latent_size, 7.5).backbone
            objective = CLIPScore(str(_large_clip(Path(tmp) / "clip")), prompt="a cat")
    backbone.checkpoint_decode = option in ("decode", "all")
    if option in ("objective", "all"):
        objective = Checkpointed(objective)
    mode = ShortcutGradient(checkpoint=option in ("kept_call", "all"))
    cond = backbone.encode_condition({"prompt": ["a cat"]})
    x = torch.randn(1, *backbone.latent_shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    with PeakRSS() as rss:
        start = time.perf_counter()
        with SavedBytes(backbone, objective) as saved:
            x0 = sample(backbone.denoise, DDIM(steps), x, cond, gradient_mode=mode,
                        scheduler_config=backbone.scheduler_config)
            loss = objective(backbone.decode(x0), {"prompt": ["a cat"]}).sum()
        loss.backward()
        seconds = time.perf_counter() - start
    return {"family": family, "option": option, "latent": list(backbone.latent_shape), "steps": steps,
            "saved_MiB": round(saved.nbytes / 2**20, 3), "peak_rss_MiB": round((rss.peak - rss.base) / 2**20, 1),
            "seconds": round(seconds, 2), "grad_norm": float(x.grad.norm())}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", nargs="+", default=["tiny", "sd15"], choices=["tiny", "sd15"])
    parser.add_argument("--options", nargs="+", default=OPTIONS, choices=OPTIONS)
    parser.add_argument("--latent-size", type=int, default=16, help="sd15 latent side (16: 128 px images)")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (SDO's memory does not grow with them)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("FAMILY", "OPTION"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(child(*args.child, args.latent_size, args.steps)))
        return []
    rows = []
    for family in args.family:
        for option in args.options:
            cmd = [sys.executable, __file__, "--child", family, option, "--latent-size", str(args.latent_size),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    keys = ["family", "option", "latent", "steps", "saved_MiB", "peak_rss_MiB", "seconds", "grad_norm"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
