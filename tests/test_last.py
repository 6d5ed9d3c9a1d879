"""`--ckpt_path last` takes the newest readable checkpoint of this run only, and a run without a
logger writes into a folder of its own, never over the working directory's files."""

import json
import logging
import os
import time

import pytest
import torch

from sdo_lightning.cli import main
from test_resume import write_config


def fit(config, *extra):
    return main(["fit", "--config", str(config), *extra])


def resumed_from(caplog, config, *extra):
    """The checkpoint `sdo fit --ckpt_path last` says it resumes from."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        fit(config, *extra, "--ckpt_path", "last")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resuming from ")]
    return line.removeprefix("Resuming from ").split(" (skipped")[0]


def checkpoints(root):
    return sorted(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)


def test_last_skips_a_broken_newest_file_for_the_valid_one_beside_it(tiny_digits_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "config.yaml", "latent", tiny_digits_dir)
    fit(config)
    folder = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:200])  # truncated, and the newest file
    os.utime(last, (time.time() + 10, time.time() + 10))
    chosen = resumed_from(caplog, config)
    assert chosen.endswith(".ckpt") and os.path.basename(chosen) != "last.ckpt"
    assert torch.load(chosen, weights_only=True)["global_step"] > 0


def test_last_does_not_continue_another_runs_checkpoint(tiny_digits_dir, tmp_path, monkeypatch):
    """Same module, seed, objective, backbone and solver, but another target class and learning
    rate: its checkpoint is not this run's."""
    monkeypatch.chdir(tmp_path)
    fit(write_config(tmp_path / "a.yaml", "latent", tiny_digits_dir))
    other = write_config(tmp_path / "b.yaml", "latent", tiny_digits_dir)
    other.write_text(other.read_text().replace("target: 3", "target: 5").replace("lr: 0.2", "lr: 0.3"))
    with pytest.raises(FileNotFoundError, match=r"none of the \d+ checkpoints .* is of this run .*"
                                                r"data\.init_args\.target 3 there, 5 here"):
        fit(other, "--ckpt_path", "last")


def test_without_a_logger_results_and_last_stay_in_their_own_folders(tiny_digits_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "summary.json").write_text('{"mine": true}')  # the user's own file
    foreign = tmp_path / "some_other_project" / "models" / "model.ckpt"
    foreign.parent.mkdir(parents=True)
    torch.save({"state_dict": {"variable": torch.zeros(1)}, "global_step": 99}, foreign)
    config = write_config(tmp_path / "config.yaml", "latent", tiny_digits_dir)
    fit(config, "--trainer.logger", "false")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"mine": True}
    first = tmp_path / "sdo_runs" / "version_0"
    assert (first / "summary.json").is_file() and (first / "config.yaml").is_file()
    assert list((first / "checkpoints").glob("*.ckpt"))
    chosen = resumed_from(caplog, config, "--trainer.logger", "false")
    assert "some_other_project" not in chosen and chosen.startswith(str(tmp_path / "sdo_runs" / "version_0"))
