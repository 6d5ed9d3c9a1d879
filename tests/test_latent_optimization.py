"""LatentOptimization on a tiny random digits model: independence, projections, targets, outputs."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from lightning.pytorch import Trainer

from sdo_lightning import Objective
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.training.data import SampleSet
from sdo_lightning.modules.latent_optimization import LatentOptimization
from sdo_lightning.solvers import DDIM
from sdo_lightning.modules.targets import IntermediateLatent, StartNoise


class WeightedBrightness(Objective, register=False):
    """Per-sample brightness loss times a per-sample weight (by batch index)."""

    def __init__(self, weights):
        super().__init__()
        self.w = torch.tensor(weights)

    def forward(self, images, batch):
        return self.w[batch["index"]] * images.flatten(1).mean(1)


def fit(module, data, tmp_path, steps=2):
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return trainer


def make(tiny_digits_dir, objective, **kw):
    kw.setdefault("solver", DDIM(4))
    return LatentOptimization(objective=objective, backbone=DigitsBackbone(tiny_digits_dir), **kw)


def test_one_samples_loss_never_moves_another(tiny_digits_dir, tmp_path):
    finals = []
    for w0 in (1.0, -5.0):
        module = make(tiny_digits_dir, WeightedBrightness([w0, 1.0, 1.0]), target=StartNoise(project_to_shell=False))
        fit(module, SampleSet(num_samples=3), tmp_path, steps=3)
        finals.append(module.variable.detach().clone())
    assert not torch.allclose(finals[0][0], finals[1][0])  # sample 0 did follow its own loss
    torch.testing.assert_close(finals[0][1:], finals[1][1:], rtol=0, atol=0)


def test_shell_projection_keeps_initial_norm(tiny_digits_dir, tmp_path):
    module = make(tiny_digits_dir, WeightedBrightness([1.0, 1.0]), lr=0.5)
    fit(module, SampleSet(num_samples=2), tmp_path, steps=2)
    torch.testing.assert_close(module.variable.detach().flatten(1).norm(dim=1), module.start_latent.flatten(1).norm(dim=1))
    assert not torch.allclose(module.variable.detach(), module.start_latent)


def test_linf_radius_bounds_the_perturbation(tiny_digits_dir, tmp_path):
    module = make(tiny_digits_dir, WeightedBrightness([1.0, 1.0]), target=StartNoise(linf_radius=0.1), lr=1.0)
    fit(module, SampleSet(num_samples=2), tmp_path, steps=2)
    delta = module.variable.detach()
    assert delta.abs().max() <= 0.1 + 1e-7
    assert delta.abs().max() > 0.09  # lr 1.0 saturates the box


def test_best_images_are_the_lowest_loss_seen(tiny_digits_dir, tmp_path):
    module = make(tiny_digits_dir, WeightedBrightness([1.0, 1.0]), lr=0.3)
    fit(module, SampleSet(num_samples=2), tmp_path, steps=3)
    best_loss = module.best_images.flatten(1).mean(1)
    torch.testing.assert_close(best_loss, module.best_loss)
    assert (module.best_loss <= module.initial_images.flatten(1).mean(1) + 1e-7).all()


def test_x_t_target_starts_from_a_hand_sampled_prefix(tiny_digits_dir, tmp_path):
    """x_t is reached by no-grad DDIM from x_T; the unoptimized images equal full sampling."""
    objective = WeightedBrightness([1.0, 1.0])
    full = make(tiny_digits_dir, objective, solver=DDIM(10), target=StartNoise(project_to_shell=False))
    fit(full, SampleSet(num_samples=2), tmp_path, steps=1)
    part = make(tiny_digits_dir, objective, solver=DDIM(10, start_timestep=600),
                target=IntermediateLatent(project_to_shell=False))
    fit(part, SampleSet(num_samples=2), tmp_path, steps=1)

    # independent prefix: a hand-written DDIM loop over the same UNet, stopped at t <= 600
    unet = UNet2DModel.from_pretrained(tiny_digits_dir / "unet")
    sched = DDIMScheduler.from_pretrained(tiny_digits_dir / "scheduler", clip_sample=False)
    sched.set_timesteps(10)
    x = full.start_latent.clone()
    labels = torch.full((2,), 10)
    with torch.no_grad():
        for t in sched.timesteps:
            if t <= 600:
                break
            x = sched.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
    torch.testing.assert_close(part.start_latent, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.initial_images, full.initial_images, rtol=1e-4, atol=1e-5)


def test_embedding_target_is_optimized(tiny_digits_dir, tmp_path):
    module = make(tiny_digits_dir, WeightedBrightness([1.0, 1.0]), target="embedding",
                  backbone_guidance=None) if False else LatentOptimization(
        objective=WeightedBrightness([1.0, 1.0]), backbone=DigitsBackbone(tiny_digits_dir, guidance_scale=2.0),
        solver=DDIM(4), target="embedding", lr=0.1)
    fit(module, SampleSet(num_samples=2, class_label=[3, 5]), tmp_path, steps=2)
    table = module.backbone.unet.class_embedding.weight
    start = table[torch.tensor([3, 5])]
    assert module.variable.shape == start.shape
    assert not torch.allclose(module.variable.detach(), start)


def test_wrong_shape_objective_is_a_clear_error(tiny_digits_dir, tmp_path):
    class Scalar(Objective, register=False):
        def forward(self, images, batch):
            return images.mean()

    with pytest.raises(ValueError, match=r"one loss per sample, shape \(2,\)"):
        fit(make(tiny_digits_dir, Scalar()), SampleSet(num_samples=2), tmp_path, steps=1)


def test_checkpoint_holds_trainable_state_only_and_resumes(tiny_digits_dir, tmp_path):
    module = make(tiny_digits_dir, WeightedBrightness([1.0, 1.0]))
    trainer = fit(module, SampleSet(num_samples=2), tmp_path, steps=1)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert "variable" in state and not any(k.startswith(("backbone.", "objective.")) for k in state)
    resumed = make(tiny_digits_dir, WeightedBrightness([1.0, 1.0]))
    Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            default_root_dir=tmp_path).fit(resumed, datamodule=SampleSet(num_samples=2), ckpt_path=path)
    straight = make(tiny_digits_dir, WeightedBrightness([1.0, 1.0]))
    fit(straight, SampleSet(num_samples=2), tmp_path, steps=2)
    torch.testing.assert_close(resumed.variable, straight.variable)


def test_fit_writes_png_npz_and_logs(tiny_digits_dir, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    module = make(tiny_digits_dir, WeightedBrightness([1.0, 1.0, 1.0]))
    logger = TensorBoardLogger(tmp_path / "runs")
    Trainer(max_steps=2, accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
            log_every_n_steps=1).fit(module, datamodule=SampleSet(num_samples=3))
    log_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    data = np.load(log_dir / "samples.npz")
    assert data["before"].shape == data["after"].shape == (3, 1, 8, 8)
    assert 0 <= data["after"].min() and data["after"].max() <= 1
    np.testing.assert_allclose(data["before"], module.initial_images.numpy())
    from PIL import Image

    assert Image.open(log_dir / "before_after.png").size[0] > 64
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert {"before", "after"} <= set(events.Tags()["images"])


def test_x_t_by_inversion_of_real_images_reconstructs_them(tmp_path):
    """On the shipped digits model, inverting real digits to t=600 and sampling back without
    optimization returns images close to the originals."""
    from sdo_lightning.digits import load_digits_images

    module = LatentOptimization(objective=WeightedBrightness([1.0] * 4), solver=DDIM(50, start_timestep=600),
                                target=IntermediateLatent(invert_images=True, project_to_shell=False))
    fit(module, SampleSet(num_samples=4, images="digits"), tmp_path, steps=1)
    real = load_digits_images(16)[0][:4]
    rms = (module.initial_images - real).pow(2).mean().sqrt().item()
    noise_rms = (module.start_latent - module.backbone.encode(real)).pow(2).mean().sqrt().item()
    assert noise_rms > 0.3  # x_t is really noisy
    assert rms < 0.1


def test_same_seed_same_images_and_gradients(tiny_digits_dir, tmp_path):
    runs = []
    for seed in (3, 3, 4):
        module = make(tiny_digits_dir, WeightedBrightness([1.0, 1.0]), seed=seed)
        fit(module, SampleSet(num_samples=2), tmp_path, steps=2)
        runs.append((module.variable.detach().clone(), module.best_images.clone()))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.allclose(runs[0][0], runs[2][0])


def test_compiled_channels_last_backbone_gives_the_same_output(tiny_digits_dir):
    # the "eager" backend runs torch.compile's graph capture without code generation (fast on CPU)
    fast = DigitsBackbone(tiny_digits_dir, compile="eager", channels_last=True)
    plain = DigitsBackbone(tiny_digits_dir)
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor(300), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(fast.denoise(x, t, cond), plain.denoise(x, t, cond), rtol=1e-5, atol=1e-6)
    assert set(fast.unet.state_dict()) == set(plain.unet.state_dict())


class _RecordingDDIM(DDIM, register=False):
    """DDIM that records, per step, the noise its scheduler is about to draw from each sample's
    generator (read off a copy of the generator, so sampling is unchanged)."""

    drawn: list

    def step(self, model_output, t, x, state):
        copies = [torch.Generator().set_state(g.get_state()) for g in state.generator]
        self.drawn.append(torch.stack([torch.randn(x.shape[1:], generator=g) for g in copies]))
        return super().step(model_output, t, x, state)


def test_x_t_prefix_and_optimized_chain_draw_different_noise(tiny_digits_dir, tmp_path):
    """With a stochastic solver (DDIM eta > 0) the no-grad prefix x_T -> x_t and the optimized
    chain x_t -> x_0 must inject independent noise; they used to replay one stream (cosine 1.0
    between the first noise of each)."""
    solver = _RecordingDDIM(10, eta=1.0, start_timestep=600)
    solver.drawn = []
    module = make(tiny_digits_dir, WeightedBrightness([1.0, 1.0]), solver=solver,
                  target=IntermediateLatent(project_to_shell=False))
    fit(module, SampleSet(num_samples=2), tmp_path, steps=1)
    # timesteps 900..0: the prefix calls 900, 800, 700; each chain (the unoptimized images, then
    # the training step) calls 600..0
    assert len(solver.drawn) == 3 + 7 + 7
    prefix, chain = solver.drawn[0], solver.drawn[3]
    cosine = torch.nn.functional.cosine_similarity(prefix.flatten(1), chain.flatten(1), dim=1)
    assert cosine.abs().max() < 0.5  # independent 64-dim normals: |cos| ~ 0.12
    # every optimized chain replays its own stream, so the objective is a fixed function of x_t
    torch.testing.assert_close(solver.drawn[3], solver.drawn[10], rtol=0, atol=0)


def test_latent_optimization_validates_during_fit_and_predicts_its_optimized_samples(tiny_weights, tmp_path,
                                                                                     monkeypatch):
    """The quickstart, shortened on a tiny model, validated every step on its 3 samples: val/ scalars
    in TensorBoard; ``sdo predict --ckpt_path last`` then writes the optimized samples as a DDIM loop
    by hand (diffusers' scheduler, the checkpoint's x_T) gives them, and the unoptimized ones as the base,
    reading the fit's checkpoint even when a newer run of other samples wrote one since."""
    import numpy as np
    from diffusers import DDIMScheduler, UNet2DModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdo_lightning.training.checkpoint_io import read_checkpoint
    from sdo_lightning.cli import main
    from test_cli import ROOT

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.num_samples", "3",
            "--data.eval_samples", "3", "--model.solver.num_inference_steps", "3",
            "--model.held_out_objective", "null", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    main(["fit", *args, "--trainer.max_steps", "2", "--trainer.val_check_interval", "1"])
    fit_dir = next((tmp_path / "runs").rglob("summary.json")).parent  # before the second run writes one
    scalars = set(EventAccumulator(str(fit_dir)).Reload().Tags()["scalars"])
    assert {"val/reward", "val/diversity"} <= scalars, scalars

    # a newer run of other samples: predict's "last" is the newest checkpoint of *these* samples
    main(["fit", *args, "--data.num_samples", "2", "--data.eval_samples", "2", "--trainer.max_steps", "1"])
    main(["predict", *args, "--ckpt_path", "last"])
    predicted = np.load(next((tmp_path / "runs").rglob("predictions.npz")))
    np.testing.assert_allclose(predicted["base"], np.load(fit_dir / "samples.npz")["before"], atol=1e-6)

    unet = UNet2DModel.from_pretrained(tiny_weights / "unet")
    scheduler = DDIMScheduler.from_pretrained(tiny_weights / "scheduler", clip_sample=False)
    scheduler.set_timesteps(3)

    def ddim(x):
        labels = torch.full((len(x),), 10)  # unconditional: the null class
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, eta=0.0).prev_sample
        return ((x + 1) / 2).clamp(0, 1).numpy()

    x = read_checkpoint(next(fit_dir.rglob("*.ckpt")))["state_dict"]["variable"].float()
    np.testing.assert_allclose(predicted["images"], ddim(x), atol=1e-5)
    # the rows' seeds are the samples' own: torch.randn from them gives the unoptimized x_T, so the base
    start = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(int(s))) for s in predicted["seed"]])
    np.testing.assert_allclose(predicted["base"], ddim(start), atol=1e-5)


def test_a_fit_with_a_csv_logger_records_the_settings_and_final_loss(tiny_digits_dir, tmp_path):
    """The HParams record at the end of fit works with loggers other than TensorBoard (CSVLogger
    takes no metrics argument): the settings in hparams.yaml, hp/train_loss in metrics.csv equal to
    the last logged train/loss."""
    import csv

    import yaml
    from lightning.pytorch.loggers import CSVLogger

    module = make(tiny_digits_dir, WeightedBrightness([1.0, 2.0]), lr=0.1)
    logger = CSVLogger(tmp_path, name="csv")
    Trainer(max_steps=2, accelerator="cpu", logger=logger, log_every_n_steps=1, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path).fit(module, datamodule=SampleSet(num_samples=2))
    log_dir = tmp_path / "csv" / "version_0"
    assert yaml.safe_load((log_dir / "hparams.yaml").read_text())["lr"] == 0.1
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    finals = [float(r["hp/train_loss"]) for r in rows if r.get("hp/train_loss")]
    assert finals == [pytest.approx(losses[-1])]
