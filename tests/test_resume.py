"""Resume after a real kill: `sdo fit` is SIGKILLed mid-run after a checkpoint, resumed with
`--ckpt_path last`, and must end exactly where an uninterrupted run of the same seed ends."""

import multiprocessing
import os
import signal
import textwrap
import time

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

from sdo_lightning.cli import main

STEPS, EVERY, KILL_AFTER = 4, 2, 3  # checkpoints at steps 2 and 4; killed after step 3, before the second


class BlockAfterStep(Callback):
    """Signals that optimizer step ``step`` is done (its checkpoint-less work must be redone), then
    waits to be killed."""

    def __init__(self, step: int, flag: str) -> None:
        self.step, self.flag = step, flag

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            open(self.flag, "w").close()
            time.sleep(120)


MODELS = {
    "latent": """
        class_path: LatentOptimization
        init_args:
          objective: {class_path: L2Fidelity}
          backbone: {class_path: DigitsBackbone, init_args: {path: %(weights)s}}
          solver: {class_path: DDIM, init_args: {num_inference_steps: 3}}
          lr: 0.2
          seed: 1
    """,
    "lora": """
        class_path: RewardFineTuning
        init_args:
          objective: {class_path: ClassifierObjective, init_args: {target_class: 3}}
          backbone: {class_path: DigitsBackbone, init_args: {path: %(weights)s}}
          solver: {class_path: DDIM, init_args: {num_inference_steps: 3}}
          lora_rank: 2
          lr: 0.05
    """,
}


def write_config(path, model, weights, extra_callbacks=""):
    # L2Fidelity alone is 0 at the start: give it something to pull towards (a brightness shift)
    model_yaml = textwrap.indent(textwrap.dedent(MODELS[model] % {"weights": weights}).strip(), "  ")
    if model == "latent":
        # the quickstart's objective draws its augmented copies from the global generator
        model_yaml = model_yaml.replace("objective: {class_path: L2Fidelity}",
                                        "objective: {class_path: ClassifierObjective, init_args: {augment: 4, noise_std: 0.2}}")
    path.write_text(textwrap.dedent(f"""\
        seed_everything: 7
        trainer:
          max_steps: {STEPS}
          accelerator: cpu
          enable_progress_bar: false
          callbacks:
            - class_path: ModelCheckpoint
              init_args: {{every_n_train_steps: {EVERY}, save_last: true}}
            - class_path: sdo_lightning.training.callbacks.InterruptCheckpoint
        """) + textwrap.indent(extra_callbacks, "    ") + "model:\n" + model_yaml + "\n" + textwrap.dedent("""\
        data:
          class_path: SampleSet
          init_args: {num_samples: 3, target: 3}
        """))
    return path


def _killed_run(config, cwd):
    os.chdir(cwd)
    main(["fit", "--config", str(config)])
    os._exit(3)  # not reached: killed while blocked


def last_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    return ckpt


@pytest.mark.parametrize("model", ["latent", "lora"])
def test_killed_and_resumed_equals_uninterrupted(model, tiny_digits_dir, tmp_path, monkeypatch):
    killed_dir, ref_dir = tmp_path / "killed", tmp_path / "ref"
    killed_dir.mkdir()
    ref_dir.mkdir()
    flag = tmp_path / "blocked"
    block = f"- class_path: {__name__}.BlockAfterStep\n  init_args: {{step: {KILL_AFTER}, flag: {flag}}}\n"
    blocking = write_config(tmp_path / "blocking.yaml", model, tiny_digits_dir, block)
    config = write_config(tmp_path / "config.yaml", model, tiny_digits_dir)

    # 1. a real process, killed with SIGKILL after step 3 (its step-2 checkpoint is on disk)
    child = multiprocessing.get_context("fork").Process(target=_killed_run, args=(blocking, killed_dir))
    child.start()
    deadline = time.time() + 120
    while not flag.exists() and child.is_alive() and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists(), f"the run did not reach step {KILL_AFTER} (exit code {child.exitcode})"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    first = killed_dir / "runs" / "lightning_logs" / "version_0"
    assert last_state(first)["global_step"] == EVERY  # the step-3 work was lost with the process
    assert not (first / "samples.npz").exists()

    # 2. resumed with `sdo fit --config ... --ckpt_path last`: finds version_0's checkpoint
    monkeypatch.chdir(killed_dir)
    main(["fit", "--config", str(config), "--ckpt_path", "last"])
    resumed = killed_dir / "runs" / "lightning_logs" / "version_1"

    # 3. the same seed, never interrupted, in another directory
    monkeypatch.chdir(ref_dir)
    main(["fit", "--config", str(config)])
    straight = ref_dir / "runs" / "lightning_logs" / "version_0"

    a, b = last_state(resumed), last_state(straight)
    assert a["global_step"] == b["global_step"] == STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys() and a["state_dict"]
    for k in b["state_dict"]:  # latents / adapters and (latent) best images
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for k in sb:
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
    assert torch.equal(a["plan_generator_state"], b["plan_generator_state"])  # the kept-call draws
    if model == "latent":
        ra, rb = np.load(resumed / "samples.npz"), np.load(straight / "samples.npz")
        np.testing.assert_array_equal(ra["after"], rb["after"])
        assert np.abs(ra["after"] - ra["before"]).max() > 1e-3
    else:
        la, lb = (load_file(str(d / "lora" / "adapter_model.safetensors")) for d in (resumed, straight))
        assert la.keys() == lb.keys() and any(v.abs().max() > 0 for k, v in la.items() if "lora_B" in k)
        for k in lb:
            assert torch.equal(la[k], lb[k]), k


def test_ckpt_path_last_without_checkpoints_is_a_clear_error(tiny_digits_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "config.yaml", "latent", tiny_digits_dir)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(["fit", "--config", str(config), "--ckpt_path", "last"])
