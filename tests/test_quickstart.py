"""The quickstart's promise on a smaller instance, with the shipped digits model."""

import torch
from lightning.pytorch import Trainer

from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.data import SampleSet
from sdo_lightning.digits import WEIGHTS_DIR, DigitClassifier
from sdo_lightning.latent_optimization import LatentOptimization
from sdo_lightning.objectives import ClassifierObjective, L2Fidelity, WeightedSum
from sdo_lightning.solvers import DDIM


def test_shipped_weights_are_small():
    total = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total <= 10 * 2**20


def test_target_probability_rises_on_shipped_model(tmp_path):
    torch.manual_seed(0)
    objective = WeightedSum([ClassifierObjective(augment=4, noise_std=0.2), L2Fidelity()], [1.0, 0.1])
    module = LatentOptimization(objective=objective, backbone=DigitsBackbone(), solver=DDIM(20), lr=0.1)
    Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path).fit(module, datamodule=SampleSet(num_samples=4, target=7))
    # scored by a separately loaded classifier on the images the module kept
    judge = DigitClassifier.from_pretrained(WEIGHTS_DIR / "classifier")
    with torch.no_grad():
        before = judge(module.initial_images).softmax(-1)[:, 7].mean().item()
        after = judge(module.best_images).softmax(-1)[:, 7].mean().item()
    assert before < 0.4
    assert after > 0.8
