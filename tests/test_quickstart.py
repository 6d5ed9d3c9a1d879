"""The quickstart's promise on a smaller instance, with the shipped digits model."""

import torch
from lightning.pytorch import Trainer

import pytest

from sdo_lightning.backbones import DigitsBackbone, FlowDigitsBackbone
from sdo_lightning.data import SampleSet
from sdo_lightning.digits import FLOW_WEIGHTS_DIR, WEIGHTS_DIR, DigitClassifier
from sdo_lightning.latent_optimization import LatentOptimization
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
