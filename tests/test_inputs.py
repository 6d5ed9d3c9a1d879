"""Bad input ends in one sentence, the way users hit it; accepted nonsense is refused."""

import sys

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.cli import console_main
from sdo_lightning.training.data import SampleSet
from sdo_lightning.modules.latent_optimization import LatentOptimization
from sdo_lightning.objectives import ClassifierObjective
from sdo_lightning.solvers import DDIM
from sdo_lightning.modules.targets import StartNoise
from test_cli import ROOT

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def one_line_error(capsys, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["sdo", *argv])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def fit(module, data, tmp_path, steps=1, **kw):
    Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, **kw).fit(module, datamodule=data)


@pytest.mark.parametrize("case", ["missing", "truncated", "text", "no_images_entry", "wrong_shape"])
def test_unreadable_image_sets(case, tmp_path):
    path = tmp_path / "faces.npz"
    np.savez(path, images=np.random.rand(4, 1, 8, 8).astype(np.float32), other=np.zeros(3))
    if case == "missing":
        path = tmp_path / "nowhere.npz"
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif case == "text":
        path.write_text("not an archive")
    elif case == "no_images_entry":
        np.savez(path, pictures=np.zeros((4, 1, 8, 8)))
    elif case == "wrong_shape":
        np.savez(path, images=np.zeros((4, 8, 8)))
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        SampleSet(num_samples=2, images=str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "(N, C, H, W)" in message


def test_a_truncated_png_reference_is_one_sentence(tmp_path):
    from PIL import Image

    from sdo_lightning.objectives._inputs import load_image

    path = tmp_path / "style.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"is not a readable image \(\w+\); give a PNG/JPG file"):
        load_image(path)


def test_class_labels_and_targets_out_of_range(tiny_digits_dir, tmp_path):
    backbone = DigitsBackbone(tiny_digits_dir)
    with pytest.raises(ValueError, match=r"class labels must be in 0\.\.10 .* got \[12\]"):
        backbone.encode_condition({"index": torch.arange(2), "class_label": torch.tensor([12, 12])})
    with pytest.raises(ValueError, match=r"target classes must be in 0\.\.9, got \[3, 11\]"):
        ClassifierObjective()(torch.rand(2, 1, 16, 16), {"target": torch.tensor([11, 3])})


def test_accumulate_grad_batches_zero_is_refused(tiny_digits_dir, tmp_path):
    module = LatentOptimization(objective=ClassifierObjective(target_class=3), backbone=DigitsBackbone(tiny_digits_dir),
                                solver=DDIM(2))
    with pytest.raises(Exception, match="accumulate_grad_batches") as info:
        fit(module, SampleSet(num_samples=2), tmp_path, accumulate_grad_batches=0)
    assert "\n" not in str(info.value)


def test_negative_linf_radius_is_refused():
    with pytest.raises(ValueError, match="linf_radius must be > 0"):
        StartNoise(linf_radius=-1.0)


def test_zero_steps_reports_no_change_with_a_random_objective(tiny_digits_dir, tmp_path):
    """max_steps 0: before and after are the same images, so the summary must say the same loss,
    even though the objective averages over random augmented copies."""
    import json

    module = LatentOptimization(objective=ClassifierObjective(target_class=3, augment=4, noise_std=0.3),
                                backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(2))
    fit(module, SampleSet(num_samples=2), tmp_path, steps=0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["before"] == summary["after"]


@pytest.mark.parametrize("argv, expected", [
    (["--trainer.max_steps", "-5"], "max_steps"),
    (["--trainer.devices", "0"], "devices"),
    (["--data.images", "nowhere.npz"], "nowhere.npz' is not a file"),
])
def test_command_line_mistakes_are_one_line(argv, expected, tiny_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, monkeypatch, ["fit", "--config", QUICKSTART, "--trainer.logger", "false", *argv])
    assert expected in line, line


def test_a_gpu_on_a_machine_without_one_is_one_line(tiny_weights, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, monkeypatch, ["fit", "--config", QUICKSTART, "--trainer.logger", "false",
                                                "--trainer.accelerator", "gpu"])
    assert "gpu" in line.lower() or "cuda" in line.lower(), line


def test_ddim_eta_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        DDIM(4, eta=2.5)  # found by tests/test_fuzz_fit.py: NaN samples, a NaN summary


def test_a_model_that_samples_nan_is_refused_before_optimizing(tiny_digits_dir, tmp_path, monkeypatch):
    backbone = DigitsBackbone(tiny_digits_dir)
    monkeypatch.setattr(backbone, "denoise", lambda x, t, cond: torch.full_like(x, float("nan")))
    module = LatentOptimization(objective=ClassifierObjective(target_class=3), backbone=backbone, solver=DDIM(2))
    with pytest.raises(ValueError, match=r"the unoptimized samples are not finite .* DigitsBackbone with DDIM"):
        fit(module, SampleSet(num_samples=2), tmp_path)


def test_a_log_directory_that_is_a_file_is_one_line(tiny_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the logs would go")
    line = one_line_error(capsys, monkeypatch, ["fit", "--config", QUICKSTART, "--trainer.max_steps", "1"])
    assert "runs" in line, line
