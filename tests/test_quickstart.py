"""The quickstart's promise on a smaller instance, with the shipped digits model."""

import torch
from lightning.pytorch import Trainer

import pytest

from sdo_lightning.backbones import DigitsBackbone, FlowDigitsBackbone
from sdo_lightning.training.data import SampleSet
from sdo_lightning.digits import FLOW_WEIGHTS_DIR, WEIGHTS_DIR, DigitClassifier
from sdo_lightning.modules.latent_optimization import LatentOptimization
from sdo_lightning.objectives import ClassifierObjective, L2Fidelity, WeightedSum
from sdo_lightning.solvers import DDIM, FlowMatchEuler


@pytest.mark.parametrize("weights", [WEIGHTS_DIR, FLOW_WEIGHTS_DIR], ids=["ddpm", "flow"])
def test_shipped_weights_are_small(weights):
    total = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())
    assert total <= 10 * 2**20


@pytest.mark.parametrize("backbone, solver", [(DigitsBackbone, DDIM), (FlowDigitsBackbone, FlowMatchEuler)],
                         ids=["ddpm", "flow"])
def test_target_probability_rises_on_shipped_model(backbone, solver, tmp_path):
    torch.manual_seed(0)
    objective = WeightedSum([ClassifierObjective(augment=4, noise_std=0.2), L2Fidelity()], [1.0, 0.1])
    module = LatentOptimization(objective=objective, backbone=backbone(), solver=solver(20), lr=0.1)
    Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path).fit(module, datamodule=SampleSet(num_samples=4, target=7))
    # scored by a separately loaded classifier on the images the module kept
    judge = DigitClassifier.from_pretrained(WEIGHTS_DIR / "classifier")
    with torch.no_grad():
        before = judge(module.initial_images).softmax(-1)[:, 7].mean().item()
        after = judge(module.best_images).softmax(-1)[:, 7].mean().item()
    assert before < 0.4
    assert after > 0.8


# -- the gold reward: DigitsJudge ---------------------------------------------------------------

def _sklearn_judge(size):
    """scikit-learn's own fit and predict_proba, written out here (independent of DigitsJudge)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from sdo_lightning.digits import load_digits_images

    images, labels = load_digits_images(size)
    with threadpool_limits(1):  # shared cores: BLAS threads slow the fit 100x
        return LogisticRegression(max_iter=5000).fit(images.flatten(1).double().numpy(), labels.numpy())


def test_digits_judge_is_sklearns_predict_proba():
    from sdo_lightning.digits import load_digits_images
    from sdo_lightning.digits.judge import DigitsJudge

    reference = _sklearn_judge(8)
    real = load_digits_images(8)[0][:5]
    noise = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = torch.cat([real, noise])
    expected = torch.from_numpy(reference.predict_proba(images.flatten(1).double().numpy()))
    judge = DigitsJudge()  # fitted for the size of the first images it scores
    loss = judge(images, {"target": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])})
    torch.testing.assert_close(judge.probabilities(images), expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss, (1 - expected[torch.arange(8), torch.arange(8)]).float(), rtol=1e-6, atol=1e-7)
    fixed = DigitsJudge(target_class=7)
    torch.testing.assert_close(fixed(images, {}), (1 - expected[:, 7]).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fixed.terms["judge_prob"], expected[:, 7].float(), rtol=1e-6, atol=1e-7)
    assert (reference.predict(real.flatten(1).double().numpy()) == load_digits_images(8)[1][:5].numpy()).all()


def test_digits_judge_refuses_what_it_cannot_score():
    from sdo_lightning.digits.judge import DigitsJudge

    with pytest.raises(ValueError, match="target_class must be a digit 0..9"):
        DigitsJudge(target_class=10)
    with pytest.raises(KeyError, match="DigitsJudge has no target"):
        DigitsJudge()(torch.rand(2, 1, 8, 8), {})
    with pytest.raises(ValueError, match="grey square digit images"):
        DigitsJudge(target_class=1)(torch.rand(2, 3, 8, 8), {})


def test_quickstart_logs_the_judge_and_optimizes_exactly_as_without_it(tiny_weights, tmp_path, monkeypatch):
    """The quickstart, shortened on a tiny model: train/held_out is in TensorBoard, summary.json's
    held_out is 1 - scikit-learn's p(7) of the written samples, and without the held-out objective
    the same seed gives the same samples and objective figures, bitwise."""
    import json

    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdo_lightning.cli import main
    from test_cli import ROOT

    monkeypatch.chdir(tmp_path)
    short = ["--trainer.max_steps", "3", "--data.num_samples", "3", "--model.solver.num_inference_steps", "3",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false"]
    runs = {}
    for name, extra in (("judged", []), ("plain", ["--model.held_out_objective", "null"])):
        save_dir = tmp_path / name
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), *short, *extra,
              "--trainer.logger.init_args.save_dir", str(save_dir)])
        log_dir = next(save_dir.rglob("summary.json")).parent
        runs[name] = (json.loads((log_dir / "summary.json").read_text()), np.load(log_dir / "samples.npz"), log_dir)
    (judged, data, log_dir), (plain, plain_data, plain_dir) = runs["judged"], runs["plain"]
    scalars = set(EventAccumulator(str(log_dir)).Reload().Tags()["scalars"])
    assert "train/held_out" in scalars
    assert "train/held_out" not in set(EventAccumulator(str(plain_dir)).Reload().Tags()["scalars"])
    reference = _sklearn_judge(8)
    for label in ("before", "after"):
        p7 = reference.predict_proba(data[label].reshape(3, -1).astype(np.float64))[:, 7]
        assert judged[label]["held_out"] == pytest.approx(float(np.mean(1 - p7)), rel=1e-6)
        assert {k: v for k, v in judged[label].items() if k != "held_out"} == plain[label]
        np.testing.assert_array_equal(data[label], plain_data[label])
