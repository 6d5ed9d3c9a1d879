"""Checkpoint files: written atomically beside their target, read without running code, and
every unreadable input ends in one sentence."""

import errno
import pickle

import pytest
import torch
from lightning.pytorch import Trainer

from sdo_lightning.training.checkpoint_io import SafeCheckpointIO, read_checkpoint


class _Payload:
    """A pickled object: loading it unrestricted would import and construct it (run code)."""

    def __reduce__(self):
        return (print, ("this ran",))


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"variable": torch.ones(3)}, "global_step": 2}, path)
    return path


def test_reads_a_checkpoint(good):
    assert read_checkpoint(good)["global_step"] == 2


@pytest.mark.parametrize("case", ["url", "directory", "missing", "empty", "truncated", "random", "yaml", "code",
                                  "not_lightning"])
def test_unreadable_checkpoints_are_one_sentence(case, good, tmp_path, capsys):
    path = tmp_path / f"{case}.ckpt"
    if case == "url":
        path = "http://example.com/model.ckpt"
    elif case == "directory":
        path = tmp_path
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "random":
        path.write_bytes(bytes(range(256)) * 4)
    elif case == "yaml":
        path.write_text("model:\n  lr: 0.1\n")
    elif case == "code":
        path.write_bytes(pickle.dumps({"state_dict": {}, "payload": _Payload()}))
    elif case == "not_lightning":
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(ValueError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".") and str(path) in message
    assert "this ran" not in capsys.readouterr().out  # nothing was executed
    if case == "code":
        assert "could run code" in message


def test_a_failed_write_keeps_the_previous_checkpoint_and_no_temporary_file(good, monkeypatch):
    before = good.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        SafeCheckpointIO().save_checkpoint({"state_dict": {}}, good)
    assert good.read_bytes() == before
    assert [p.name for p in good.parent.iterdir()] == [good.name]


def test_a_write_replaces_the_file_and_clears_stale_temporaries(good):
    (good.parent / f".{good.name}.abc.tmp").write_bytes(b"left by a kill")
    SafeCheckpointIO().save_checkpoint({"state_dict": {"v": torch.zeros(1)}, "global_step": 5}, good)
    assert read_checkpoint(good)["global_step"] == 5
    assert [p.name for p in good.parent.iterdir()] == [good.name]


def test_modules_install_the_safe_checkpoint_io(tiny_digits_dir, tmp_path):
    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.modules.latent_optimization import LatentOptimization
    from sdo_lightning.objectives import L2Fidelity
    from sdo_lightning.solvers import DDIM

    module = LatentOptimization(objective=L2Fidelity(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(2))
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=SampleSet(num_samples=2))
    assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    assert read_checkpoint(ckpt)["global_step"] == 1
