"""The gradient-free baselines (BestOfN, ZeroOrder) against reference loops written out by hand."""

import json

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from sdo_lightning import Objective, registry, sample
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.training.data import SampleSet
from sdo_lightning.modules.latent_optimization import LatentOptimization
from sdo_lightning.searches import BestOfN, ZeroOrder, candidate_seed
from sdo_lightning.solvers import DDIM
from sdo_lightning.modules.targets import ConditionEmbedding, IntermediateLatent, StartNoise

from test_cli import ROOT

STEPS, SEED = 3, 4


class DigitThree(Objective, register=False):
    """A deterministic non-linear per-sample loss: -log softmax of the tiny classifier, class 3."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images, batch):
        return -torch.log_softmax(self.classifier(images), dim=-1)[:, 3]


def classifier(tiny_digits_dir):
    from sdo_lightning.digits import DigitClassifier

    return DigitClassifier.from_pretrained(tiny_digits_dir / "classifier").eval().requires_grad_(False)


def module(tiny_digits_dir, mode, **kw):
    return LatentOptimization(objective=DigitThree(classifier(tiny_digits_dir)), backbone=DigitsBackbone(tiny_digits_dir),
                              solver=DDIM(3), gradient_mode=mode, seed=SEED, **kw)


class BestLosses(Callback):
    def __init__(self):
        self.best = []

    def on_train_batch_end(self, trainer, module, *args):
        self.best.append(module.best_loss.clone())


def fit(m, tmp_path, steps=STEPS, n=3, ckpt_path=None, callbacks=(), checkpointing=False):
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=checkpointing,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=list(callbacks))
    trainer.fit(m, datamodule=SampleSet(num_samples=n), ckpt_path=ckpt_path)
    return trainer


def _reference_parts(tiny_digits_dir, n):
    """A separately loaded model and objective, the start noises and a scorer written out here."""
    backbone = DigitsBackbone(tiny_digits_dir)
    objective = DigitThree(classifier(tiny_digits_dir))
    cond = backbone.encode_condition(SampleSet(num_samples=n).full_batch())
    # the start noise of sample i: seed * 100003 + i (progress.latent_noise_seed)
    starts = torch.stack([torch.randn(backbone.latent_shape, generator=torch.Generator().manual_seed(SEED * 100003 + i))
                          for i in range(n)])

    def score(x):
        with torch.no_grad():
            x0 = sample(backbone.denoise, DDIM(3), x, cond, scheduler_config=backbone.scheduler_config)
            images = backbone.decode(x0)
            return objective(images, {}), images

    def noise(i, step, c):
        return torch.randn(backbone.latent_shape, generator=torch.Generator().manual_seed(candidate_seed(SEED, i, step, c)))

    return starts, score, noise


def test_best_of_n_keeps_the_argmin_of_hand_drawn_candidates(tiny_digits_dir, tmp_path):
    n, c = 3, 2
    m = module(tiny_digits_dir, BestOfN(candidates=c))
    trainer = fit(m, tmp_path, n=n)
    assert trainer.global_step == STEPS

    starts, score, noise = _reference_parts(tiny_digits_dir, n)
    best_loss, best_images = score(starts)
    best_x = starts.clone()
    for step in range(STEPS):
        for k in range(c):
            x = torch.stack([noise(i, step, k) for i in range(n)])
            x = x * (starts.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)  # the start's shell
            loss, images = score(x)
            for i in range(n):
                if loss[i] < best_loss[i]:
                    best_loss[i], best_images[i], best_x[i] = loss[i], images[i], x[i]
    torch.testing.assert_close(m.best_loss, best_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.best_images, best_images, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.variable.detach(), best_x, rtol=1e-5, atol=1e-6)
    assert not torch.equal(best_x, starts)  # some draw did beat the start


def test_zero_order_is_a_hand_written_hill_climb_that_never_gets_worse(tiny_digits_dir, tmp_path):
    n, c, sigma = 3, 2, 0.5
    m = module(tiny_digits_dir, ZeroOrder(candidates=c, sigma=sigma), target=StartNoise(project_to_shell=False))
    record = BestLosses()
    fit(m, tmp_path, n=n, callbacks=[record])

    starts, score, noise = _reference_parts(tiny_digits_dir, n)
    current, (current_loss, _) = starts.clone(), score(starts)
    history = []
    for step in range(STEPS):
        proposals = [current + sigma * torch.stack([noise(i, step, k) for i in range(n)]) for k in range(c)]
        # the best of the step's proposals replaces the current point where it is lower
        losses = torch.stack([score(x)[0] for x in proposals])
        pick = losses.argmin(0)
        for i in range(n):
            if losses[pick[i], i] < current_loss[i]:
                current[i], current_loss[i] = proposals[pick[i]][i], losses[pick[i], i]
        history.append(current_loss.clone())
    torch.testing.assert_close(m.variable.detach(), current, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(record.best), torch.stack(history), rtol=1e-5, atol=1e-6)
    best = torch.stack(record.best)
    assert (best[1:] <= best[:-1]).all() and (best[-1] < best[0]).any()


def test_zero_order_resumed_mid_run_ends_where_an_uninterrupted_run_ends(tiny_digits_dir, tmp_path):
    straight = module(tiny_digits_dir, ZeroOrder(candidates=2), target=StartNoise())
    fit(straight, tmp_path / "a", steps=4)
    first = module(tiny_digits_dir, ZeroOrder(candidates=2), target=StartNoise())
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(first, tmp_path / "b", steps=2, callbacks=[every], checkpointing=True)
    (path,) = list((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    resumed = module(tiny_digits_dir, ZeroOrder(candidates=2), target=StartNoise())
    trainer = fit(resumed, tmp_path / "c", steps=4, ckpt_path=str(path))
    assert trainer.global_step == 4
    for name in ("variable", "best_loss", "best_images"):
        torch.testing.assert_close(getattr(resumed, name).detach(), getattr(straight, name).detach(), rtol=0, atol=0)
    assert not torch.equal(straight.variable.detach(), straight.start_latent)  # it did move


@pytest.mark.parametrize("target", [IntermediateLatent(), ConditionEmbedding(), StartNoise(linf_radius=0.1)],
                         ids=["x_t", "embedding", "linf"])
def test_best_of_n_refuses_targets_other_than_the_start_noise(target, tiny_digits_dir):
    solver = DDIM(3, start_timestep=500) if isinstance(target, IntermediateLatent) else DDIM(3)
    with pytest.raises(ValueError, match=r"^BestOfN draws fresh start noises, so it needs target StartNoise \(x_T\) "
                                         r"without linf_radius, got .*; use ZeroOrder to search around another target\.$"):
        LatentOptimization(objective=DigitThree(classifier(tiny_digits_dir)), backbone=DigitsBackbone(tiny_digits_dir),
                           solver=solver, gradient_mode=BestOfN(), target=target)


@pytest.mark.parametrize("mode", [BestOfN(), ZeroOrder()], ids=["best_of_n", "zero_order"])
def test_a_search_refuses_reward_fine_tuning(mode, tiny_digits_dir, tmp_path):
    from sdo_lightning.modules.reward_finetuning import RewardFineTuning

    name = type(mode).__name__
    with pytest.raises(ValueError, match=rf"^{name} searches without gradients, so it plans no network graph: use it "
                                         r"as the gradient_mode of LatentOptimization only \(RewardFineTuning needs "
                                         r"a gradient mode: ShortcutGradient, FullBackprop, TruncatedBackprop or DRTune\)\.$"):
        # refused at the first step (plan), or at construction where RewardFineTuning checks
        m = RewardFineTuning(objective=DigitThree(classifier(tiny_digits_dir)), backbone=DigitsBackbone(tiny_digits_dir),
                             solver=DDIM(2), gradient_mode=mode)
        fit(m, tmp_path, steps=1)


@pytest.mark.parametrize("setting, words", [({"gradient_clip_val": 0.1}, "gradient_clip_val 0.1"),
                                            ({"accumulate_grad_batches": 2}, "accumulate_grad_batches 2"),
                                            ("scaler", "precision 16-mixed")])
def test_a_search_refuses_trainer_settings_that_need_gradients(setting, words, tiny_digits_dir, tmp_path):
    if setting == "scaler":  # fp16 with a gradient scaler, as on a GPU (on the CPU 16-mixed has none)
        from lightning.pytorch.plugins import MixedPrecision

        setting = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **setting)
    with pytest.raises(ValueError, match=rf"^BestOfN searches without gradients, so it cannot run with {words}"):
        trainer.fit(module(tiny_digits_dir, BestOfN()), datamodule=SampleSet(num_samples=2))


@pytest.mark.parametrize("bad, match", [(lambda: BestOfN(candidates=0), "BestOfN candidates must be an integer >= 1"),
                                        (lambda: ZeroOrder(sigma=0.0), "ZeroOrder sigma must be > 0")])
def test_bad_search_options_are_one_sentence(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_sdo_fit_flips_the_quickstart_to_best_of_n(tiny_weights, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdo_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.gradient_mode", "BestOfN",
                "--model.gradient_mode.candidates", "2", "--trainer.max_steps", "2", "--data.num_samples", "2",
                "--model.solver.num_inference_steps", "3", "--trainer.enable_progress_bar", "false"])
    assert type(cli.model.gradient_mode).__name__ == "BestOfN" and cli.trainer.global_step == 2
    log_dir = next(tmp_path.rglob("summary.json")).parent
    summary = json.loads((log_dir / "summary.json").read_text())
    assert {"loss", "held_out"} <= set(summary["after"])
    events = EventAccumulator(str(log_dir)).Reload()
    assert {"train/loss", "train/held_out", "train/best_loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/best_loss")] == [0, 1]
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()


class NaNOnCall(DigitThree, register=False):
    """DigitThree, but NaN at objective call ``at`` (0 scores the unoptimized samples)."""

    def __init__(self, classifier, at):
        super().__init__(classifier)
        self.at, self.calls = at, 0

    def forward(self, images, batch):
        loss = super().forward(images, batch)
        self.calls += 1
        return loss * float("nan") if self.calls - 1 == self.at else loss


def test_a_non_finite_candidate_skips_the_search_step_or_stops(tiny_digits_dir, tmp_path):
    from sdo_lightning.modules.base import NonFiniteError

    m = LatentOptimization(objective=NaNOnCall(classifier(tiny_digits_dir), at=1), backbone=DigitsBackbone(tiny_digits_dir),
                           solver=DDIM(3), gradient_mode=BestOfN(candidates=2), seed=SEED)
    record = BestLosses()
    with pytest.warns(UserWarning, match="step 0: the loss is not finite"):
        fit(m, tmp_path, steps=2, callbacks=[record])
    start = DigitThree(classifier(tiny_digits_dir))(m.initial_images, {})
    torch.testing.assert_close(record.best[0], start)  # step 0 skipped: the unoptimized samples' losses
    assert m.skipped_steps == 1 and (record.best[1] <= record.best[0]).all()
    stopping = LatentOptimization(objective=NaNOnCall(classifier(tiny_digits_dir), at=1),
                                  backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(3),
                                  gradient_mode=BestOfN(candidates=2), seed=SEED, on_nonfinite="stop")
    with pytest.raises(NonFiniteError, match="step 0"):
        fit(stopping, tmp_path, steps=2)


@pytest.mark.parametrize("name", registry.names("searches"))
def test_every_search_proposes_reproducible_candidates_and_keeps_each_samples_best(name):
    """Contract test over every registered search: ``candidates`` proposals shaped like the variable,
    the same for the same seed, samples and step, other ones at another step; and ``best`` picks, row
    by row, the candidate of the lowest loss (a non-finite loss never wins)."""
    from sdo_lightning.contracts import RunContext

    from sdo_lightning.searches import BestOfN, SearchThenGradient

    # a search built of other plugins takes its candidates from the search inside it
    composed = {"SearchThenGradient": lambda: SearchThenGradient(BestOfN(candidates=3))}
    search = composed[name]() if name in composed else registry.classes("searches")[name](candidates=3)
    variable, index = torch.randn(2, 1, 4, 4), torch.tensor([0, 5])
    context = RunContext(backbone=None, solver=DDIM(2), seed=7)
    first = search.propose(variable, index, 0, context)
    assert len(first) == 3 and all(c.shape == variable.shape for c in first)
    again = search.propose(variable, index, 0, context)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(search.propose(variable, index, 1, context)[0], first[0])
    # row 0's losses 3, 1, 2 -> candidate 1; row 1's nan, 5, 4 -> candidate 2
    losses = iter([torch.tensor([3.0, float("nan")]), torch.tensor([1.0, 5.0]), torch.tensor([2.0, 4.0])])
    best = search.best(first, lambda c: (next(losses), c.flatten(1)[:, :1], {"t": c.flatten(1)[:, 0]}))
    torch.testing.assert_close(best.variable, torch.stack([first[1][0], first[2][1]]), rtol=0, atol=0)
    assert best.loss.tolist() == [1.0, 4.0]
    torch.testing.assert_close(best.terms["t"], best.variable.flatten(1)[:, 0], rtol=0, atol=0)


def test_searches_are_their_own_kind_and_reward_fine_tuning_refuses_one_at_parse_time(tiny_weights, tmp_path,
                                                                                       monkeypatch, capsys):
    from sdo_lightning.cli import main

    assert {"BestOfN", "ZeroOrder"} <= set(registry.names("searches"))
    assert not {"BestOfN", "ZeroOrder"} & set(registry.names("gradient_modes"))
    listed = [line.split()[:2] for line in registry.format_table(registry.registered()).splitlines()]  # sdo plugins
    assert ["searches", "BestOfN"] in listed and ["searches", "ZeroOrder"] in listed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "digits" / "finetune_lora.yaml"), "--model.gradient_mode",
              "BestOfN", "--trainer.max_steps", "1"], run=False)
    assert "BestOfN" in capsys.readouterr().err
