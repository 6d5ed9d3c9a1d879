"""Bad input ends in one sentence that says what to fix, and loses nothing."""

import sys
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer

from sdo_lightning import Objective
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.training.callbacks import InterruptCheckpoint
from sdo_lightning.cli import console_main
from sdo_lightning.training.data import PromptSet, SampleSet
from sdo_lightning.modules.latent_optimization import LatentOptimization
from sdo_lightning.modules.base import NonFiniteError, check_solver_fits_backbone
from sdo_lightning.modules.reward_finetuning import RewardFineTuning
from sdo_lightning.solvers import DDIM, LCMMultistep
from sdo_lightning.modules.targets import IntermediateLatent

from test_cli import ROOT

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


class Brightness(Objective, register=False):
    def forward(self, images, batch):
        return images.flatten(1).mean(1)


class NaNAt(Objective, register=False):
    """Brightness, except at call ``at`` (0-based): a NaN loss, or a finite loss with a NaN gradient."""

    def __init__(self, at, kind="loss"):
        super().__init__()
        self.at, self.kind, self.calls = at, kind, 0

    def forward(self, images, batch):
        loss = images.flatten(1).mean(1)
        self.calls += 1
        if self.calls - 1 == self.at:
            if self.kind == "loss":
                return loss * float("nan")
            return loss + 0.0 * (images * 0).sqrt().flatten(1).sum(1)  # d sqrt(0) = inf: NaN gradient
        return loss


class Snapshots(Callback):
    def __init__(self):
        self.states = []

    def on_train_batch_end(self, trainer, module, *args):
        opt = trainer.optimizers[0].state_dict()["state"]
        self.states.append(([t.detach().clone() for t in module.optimized_tensors()],
                            {k: {n: v.clone() for n, v in s.items()} for k, s in opt.items()}))


def trainer(tmp_path, steps, callbacks=(), **kw):
    return Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                   callbacks=list(callbacks), **kw)


def one_line_error(capsys, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sdo", *argv])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


# -- the command line and YAML ------------------------------------------------------------------
def test_unknown_plugin_in_yaml_lists_the_known_ones(tmp_path, tiny_weights, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text((ROOT / "configs" / "quickstart.yaml").read_text().replace(
        "class_path: ShortcutGradient", "class_path: ShortcutGradeint"))
    line = one_line_error(capsys, ["fit", "--config", str(config), "--print_config"], monkeypatch)
    assert "model.gradient_mode: 'ShortcutGradeint' is not a known gradient mode" in line
    for name in ("FullBackprop", "ShortcutGradient", "TruncatedBackprop"):
        assert name in line


@pytest.mark.parametrize("args, expected", [
    (["--model.solver.num_inference_step", "3"], "model.solver: option 'num_inference_step' is not accepted"),
    (["--model.lr", "fast"], "model.lr: Expected a <class 'float'>"),
    (["--model.solver.num_inference_steps", "0"], "ValueError: num_inference_steps must be >= 1, got 0."),
    (["--model.backbone.path", "/no/such/dir"], "FileNotFoundError: no digits model in /no/such/dir"),
    (["--data.num_samples", "0"], "ValueError: num_samples must be >= 1, got 0."),
    (["--model.on_nonfinite", "ignore"], "model.on_nonfinite: Expected a typing.Literal['skip', 'stop']"),
])
def test_wrong_values_are_one_line_errors(args, expected, tiny_weights, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    # --trainer.max_steps 0: instantiate everything, train nothing
    line = one_line_error(capsys, ["fit", "--config", QUICKSTART, "--trainer.max_steps", "0", *args], monkeypatch)
    assert expected in line, line


def test_missing_diffusers_model_reaches_the_user_as_our_sentence(tiny_weights, capsys, monkeypatch, tmp_path):
    """The backbone's own sentence (what to fetch), not the innermost diffusers/hub error."""
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no-sd-here")
    line = one_line_error(capsys, ["fit", "--config", QUICKSTART, "--trainer.max_steps", "0",
                                   "--model.backbone", "StableDiffusionBackbone", "--model.backbone.model", missing],
                          monkeypatch)
    assert line.startswith(f"error: FileNotFoundError: could not load the Stable Diffusion pipeline from '{missing}'"), line
    assert "hf download" in line


def test_missing_prompts_file_and_empty_prompts(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts_file='/no/such.txt' does not exist"):
        PromptSet(prompts_file="/no/such.txt")
    with pytest.raises(ValueError, match="no prompts"):
        PromptSet(prompts=[])


# -- shapes --------------------------------------------------------------------------------------
def test_images_of_the_wrong_size_for_inversion(tiny_digits_dir, tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, images=np.random.rand(2, 1, 12, 12).astype(np.float32))  # the tiny model is 8x8
    module = LatentOptimization(objective=Brightness(), backbone=DigitsBackbone(tiny_digits_dir),
                                solver=DDIM(4, start_timestep=600), target=IntermediateLatent(invert_images=True))
    with pytest.raises(ValueError, match=r"images of shape \(1, 12, 12\) .* \(1, 8, 8\); resize"):
        trainer(tmp_path, 1).fit(module, datamodule=SampleSet(num_samples=2, images=str(path)))


def test_reward_objective_of_the_wrong_shape(tiny_digits_dir, tmp_path):
    class Scalar(Objective, register=False):
        def forward(self, images, batch):
            return images.mean()

    module = RewardFineTuning(objective=Scalar(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(3))
    with pytest.raises(ValueError, match=r"returned shape \(\); an objective must return one loss per sample, shape \(2,\)"):
        trainer(tmp_path, 1).fit(module, datamodule=SampleSet(num_samples=2))


# -- non-finite losses and gradients -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_nonfinite_step_is_skipped_with_a_warning(kind, tiny_digits_dir, tmp_path):
    module = LatentOptimization(objective=NaNAt(1, kind), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(3),
                                lr=0.2)
    snaps = Snapshots()
    what = "loss and gradient are" if kind == "loss" else "gradient is"  # a NaN loss has a NaN gradient
    with pytest.warns(UserWarning, match=rf"step 1: the {what} not finite .*skipped this optimizer step"):
        trainer(tmp_path, 3, [snaps]).fit(module, datamodule=SampleSet(num_samples=2))
    (v0, o0), (v1, o1), (v2, o2) = snaps.states
    assert torch.equal(v1[0], v0[0])  # step 1 left the latents ...
    assert all(torch.equal(o1[k][n], o0[k][n]) for k in o0 for n in o0[k])  # ... and Adam's state alone
    assert not torch.equal(v2[0], v1[0]) and torch.isfinite(v2[0]).all()  # and training went on
    assert module.skipped_steps == 1


def test_nonfinite_step_skipped_for_lora(tiny_digits_dir, tmp_path):
    module = RewardFineTuning(objective=NaNAt(0, "gradient"), backbone=DigitsBackbone(tiny_digits_dir),
                              solver=DDIM(3), lr=0.05)
    start = [p.detach().clone() for p in module.lora_params]
    with pytest.warns(UserWarning, match="step 0: the gradient is not finite"):
        trainer(tmp_path, 1).fit(module, datamodule=SampleSet(num_samples=2))
    assert all(torch.equal(a, p) for a, p in zip(start, module.lora_params))


def test_nonfinite_stop_raises_and_writes_a_checkpoint(tiny_digits_dir, tmp_path):
    module = LatentOptimization(objective=NaNAt(2), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(3),
                                lr=0.2, on_nonfinite="stop")
    snaps = Snapshots()
    with pytest.raises(NonFiniteError, match=r"^step 2: the loss and gradient are not finite \(NaN or inf\), so the fit stops"):
        trainer(tmp_path, 4, [snaps, InterruptCheckpoint()]).fit(module, datamodule=SampleSet(num_samples=2))
    ckpt = torch.load(tmp_path / "interrupted.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2
    torch.testing.assert_close(ckpt["state_dict"]["variable"], snaps.states[-1][0][0], rtol=0, atol=0)


# -- Ctrl-C -------------------------------------------------------------------------------------
class InterruptAt(Objective, register=False):
    """Brightness; raises KeyboardInterrupt (as Ctrl-C does) inside call ``at``, after the sampling
    of that step drew its kept network call."""

    def __init__(self, at=None):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, images, batch):
        self.calls += 1
        if self.calls - 1 == self.at:
            raise KeyboardInterrupt
        return images.flatten(1).mean(1)


@pytest.mark.parametrize("accumulate, at, step", [(1, 2, 2), (2, 3, 1)])
def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(tiny_digits_dir, tmp_path, accumulate, at, step):
    """Interrupted inside a step (with accumulation: in its second micro-batch), the resumed run
    redoes that whole step and ends bitwise where an uninterrupted run ends."""
    def module(objective):
        torch.manual_seed(0)
        return RewardFineTuning(objective=objective, backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(8),
                                lr=0.05, lora_rank=2)

    interrupted = module(InterruptAt(at))
    with pytest.raises(SystemExit):  # Lightning's graceful shutdown after KeyboardInterrupt
        trainer(tmp_path / "a", 4, [InterruptCheckpoint()], accumulate_grad_batches=accumulate).fit(
            interrupted, datamodule=SampleSet(num_samples=2))
    path = tmp_path / "a" / "interrupted.ckpt"
    assert torch.load(path, weights_only=False)["global_step"] == step
    resumed = module(InterruptAt())
    trainer(tmp_path / "b", 4, accumulate_grad_batches=accumulate).fit(
        resumed, datamodule=SampleSet(num_samples=2), ckpt_path=path)
    straight = module(InterruptAt())
    trainer(tmp_path / "c", 4, accumulate_grad_batches=accumulate).fit(straight, datamodule=SampleSet(num_samples=2))
    for a, b in zip(resumed.lora_params, straight.lora_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(resumed._plan_generator.get_state(), straight._plan_generator.get_state())


# -- solver and scheduler settings ---------------------------------------------------------------
def test_lcm_solver_and_model_mismatch_warns(tiny_digits_dir, tmp_path):
    digits = DigitsBackbone(tiny_digits_dir)
    module = LatentOptimization(objective=Brightness(), backbone=digits, solver=LCMMultistep(2))
    with pytest.warns(UserWarning, match="LCMMultistep on DigitsBackbone, which does not look LCM-distilled"):
        trainer(tmp_path, 1).fit(module, datamodule=SampleSet(num_samples=1))
    digits.scheduler_config = {**digits.scheduler_config, "_class_name": "LCMScheduler"}  # as an LCM pipeline has
    with pytest.warns(UserWarning, match="holds an LCM-distilled model but the solver is DDIM: use solver LCMMultistep"):
        check_solver_fits_backbone(DDIM(4), digits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_solver_fits_backbone(LCMMultistep(2), digits)
        check_solver_fits_backbone(DDIM(4), DigitsBackbone(tiny_digits_dir))


def test_clip_sample_warning_is_reached_in_a_fit(tiny_digits_dir, tmp_path):
    module = LatentOptimization(objective=Brightness(), backbone=DigitsBackbone(tiny_digits_dir),
                                solver=DDIM(3, scheduler_kwargs={"clip_sample": True}))
    with pytest.warns(UserWarning, match=r"clip_sample=True clamps the predicted x_0.*clip_sample: false"):
        trainer(tmp_path, 1).fit(module, datamodule=SampleSet(num_samples=1))


def test_checkpoint_of_another_run_is_refused(tiny_digits_dir, tmp_path):
    """A checkpoint written by a run with another seed is not silently continued."""
    first = LatentOptimization(objective=Brightness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(2), seed=1)
    trainer(tmp_path / "a", 1).fit(first, datamodule=SampleSet(num_samples=2))
    path = tmp_path / "a" / "first.ckpt"
    first.trainer.save_checkpoint(path)
    other = LatentOptimization(objective=Brightness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(2), seed=99)
    with pytest.raises(ValueError, match="the checkpoint is from another run \\(seed 1 there, 99 here\\)"):
        trainer(tmp_path / "b", 2).fit(other, datamodule=SampleSet(num_samples=2), ckpt_path=path)
    same = LatentOptimization(objective=Brightness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(2), seed=1)
    trainer(tmp_path / "c", 2).fit(same, datamodule=SampleSet(num_samples=2), ckpt_path=path)
    assert same.trainer.global_step == 2


def test_fp16_gradscaler_overflow_is_left_to_the_scaler(tiny_digits_dir, tmp_path):
    """Under 16-mixed precision an overflowing gradient is the GradScaler's routine signal (it
    skips the step and lowers its scale), not a non-finite step: on_nonfinite: stop must not fire."""
    from lightning.pytorch.plugins import MixedPrecision

    module = LatentOptimization(objective=Brightness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(3),
                                on_nonfinite="stop")
    # a start scale that surely overflows, as GradScaler's default 65536 does for real models
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    trainer(tmp_path, 3, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(
        module, datamodule=SampleSet(num_samples=2))
    assert module.trainer.global_step == 3 and module.skipped_steps == 0
    assert scaler.get_scale() < 2.0**127  # the scaler did see the overflow and backed off
