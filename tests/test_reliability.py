"""Faults injected for real: damaged checkpoints and adapters, a process killed mid-write, a full
filesystem, NaN weights and odd arguments. Each ends in one sentence naming the fix, or leaves
every file a user keeps either whole or as it was."""

import errno
import json
import os
import re
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sdo_lightning import atomic, lora
from sdo_lightning.cli import clean_message, main

from test_evaluation import evaluation_args, fit_in, versions, write_config

torch.set_num_threads(1)
HERE = Path(__file__).parent


def one_sentence(args, cwd=None):
    """The one-line message ``sdo`` prints for ``args`` (it must be bad input, not a bug)."""
    if cwd is not None:
        os.chdir(cwd)
    with pytest.raises(Exception) as info:
        main(args)
    message = clean_message(info.value)
    assert message is not None, f"not reported as bad input: {info.value!r}"
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def fitted(tiny_digits_dir, tmp_path_factory):
    """A finished 2-step LoRA fit: its folder, config, last checkpoint and exported adapter."""
    root = tmp_path_factory.mktemp("reliability")
    config = fit_in(root, tiny_digits_dir)
    run = versions(root)[0]
    return root, config, run / "checkpoints" / "last.ckpt", run / "lora"


def damaged(path: Path, case: str, good: Path | None = None) -> Path:
    """Write a damaged file of kind ``case`` at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if case == "empty":
        path.write_bytes(b"")
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "yaml":
        path.write_text("model:\n  lr: 0.1\n")
    elif case == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": {}, "payload": Path("x")}))
    elif case == "symlink":  # a link to a file that is not an adapter
        target = path.parent / "elsewhere.bin"
        target.write_bytes(b"\x00" * 64)
        path.unlink(missing_ok=True)
        path.symlink_to(target)
    return path


# -- 4: --ckpt_path FILE is read by the project's reader, and never chooses classes --------------


@pytest.mark.parametrize("case", ["empty", "random", "yaml", "pickle"])
@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_an_explicit_bad_checkpoint_is_one_sentence(subcommand, case, tiny_digits_dir, tmp_path):
    config = write_config(tmp_path / "config.yaml", tiny_digits_dir)
    ckpt = damaged(tmp_path / f"{case}.ckpt", case)
    message = one_sentence([subcommand, "--config", str(config), "--ckpt_path", str(ckpt),
                            *evaluation_args(tiny_digits_dir)], tmp_path)
    assert str(ckpt) in message and "give a checkpoint written by sdo fit" in message


def test_a_checkpoints_hyper_parameters_choose_no_class(fitted, tiny_digits_dir, tmp_path, monkeypatch):
    """A crafted ``hyper_parameters._class_path`` must not make the CLI import a module, nor its
    other keys change the config: the checkpoint is read for its weights only."""
    root, config, ckpt, _ = fitted
    marker = tmp_path / "imported"
    (tmp_path / "sdo_crafted_payload.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nclass Evil:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"] = {"_class_path": "sdo_crafted_payload.Evil", "lr": 123.0}
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    monkeypatch.chdir(root)
    cli = main(["validate", "--config", str(config), "--ckpt_path", str(crafted), *evaluation_args(tiny_digits_dir)])
    assert not marker.exists() and "sdo_crafted_payload" not in sys.modules
    assert type(cli.model).__name__ == "RewardFineTuning" and cli.model.lr == 0.05  # the config's, not 123


# -- 5: atomic writes: a kill mid-write, a full disk ---------------------------------------------

KILL_MID_WRITE = """
import sys, time, types
from pathlib import Path
import numpy as np, torch
import numpy
import safetensors.torch

what, out = sys.argv[1], Path(sys.argv[2])

def stall(path_or_file, *args, **kwargs):  # write a little, then hang until killed
    f = open(path_or_file, "wb") if isinstance(path_or_file, (str, Path)) else path_or_file
    f.write(b"PK\\x03\\x04 half a file")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

if what == "predictions":
    from sdo_lightning.training.callbacks import PredictionWriter
    numpy.savez = stall
    writer = PredictionWriter()
    writer.outputs = [{"images": torch.zeros(2, 1, 4, 4), "seed": torch.tensor([1, 2])}]
    trainer = types.SimpleNamespace(global_rank=0, world_size=1)
    writer.on_predict_epoch_end(trainer, types.SimpleNamespace(log_dir=out))
elif what == "adapter":
    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.objectives import ClassifierObjective
    from sdo_lightning.modules.reward_finetuning import RewardFineTuning
    weights = Path(sys.argv[3])
    module = RewardFineTuning(ClassifierObjective(target_class=7, path=str(weights / "classifier")),
                              backbone=DigitsBackbone(str(weights)))
    safetensors.torch.save_file = lambda tensors, filename, metadata=None: stall(filename)
    module.export_adapter(out / "lora")
"""


def kill_mid_write(what: str, out: Path, *extra: str) -> None:
    """Run the writer ``what`` in a subprocess, and SIGKILL it while it is writing."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, what, str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "writing", proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_kill_mid_write_leaves_the_previous_predictions(tmp_path):
    previous = {"images": np.full((3, 1, 4, 4), 0.25, np.float32), "seed": np.arange(3)}
    np.savez(tmp_path / "predictions.npz", **previous)
    kill_mid_write("predictions", tmp_path)
    with np.load(tmp_path / "predictions.npz") as saved:
        np.testing.assert_array_equal(saved["images"], previous["images"])


def test_a_kill_mid_export_leaves_the_previous_adapter(fitted, tiny_digits_dir, tmp_path):
    _, _, _, adapter = fitted
    shutil.copytree(adapter, tmp_path / "lora")
    before = {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()}
    kill_mid_write("adapter", tmp_path, str(tiny_digits_dir))
    after = {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()}
    assert after == before


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and mount; skipped where either is missing)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int = 4096) -> None:
    """Fill ``disk`` but ``leave`` bytes."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    with pytest.raises(OSError) as info:  # really full now
        (disk / "probe").write_bytes(b"\0" * (2 * leave + 8192))
    assert info.value.errno == errno.ENOSPC
    (disk / "probe").unlink(missing_ok=True)


def test_a_full_disk_keeps_the_previous_predictions_and_says_so(small_disk):
    import types

    from sdo_lightning.training.callbacks import PredictionWriter

    def predict(images):
        writer = PredictionWriter()
        writer.outputs = [{"images": images, "seed": torch.arange(len(images))}]
        writer.on_predict_epoch_end(types.SimpleNamespace(global_rank=0, world_size=1),
                                    types.SimpleNamespace(log_dir=small_disk))

    predict(torch.full((2, 1, 4, 4), 0.5))
    before = (small_disk / "predictions.npz").read_bytes()
    fill(small_disk)
    with pytest.raises(atomic.WriteFailed) as info:
        predict(torch.rand(64, 1, 16, 16))  # 64 KiB of images
    message = clean_message(info.value)
    assert message is not None and "\n" not in message and "No space left" in message
    assert (small_disk / "predictions.npz").read_bytes() == before
    assert not list(small_disk.glob(".*.tmp"))  # nothing left behind


def test_a_full_disk_keeps_the_previous_checkpoint_and_adapter(fitted, tiny_digits_dir, small_disk):
    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.training.checkpoint_io import SafeCheckpointIO, read_checkpoint
    from sdo_lightning.objectives import ClassifierObjective
    from sdo_lightning.modules.reward_finetuning import RewardFineTuning

    _, _, ckpt, adapter = fitted
    io = SafeCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}}, small_disk / "last.ckpt")
    shutil.copytree(adapter, small_disk / "lora")
    before = {p.name: p.read_bytes() for p in (small_disk / "lora").iterdir()}
    fill(small_disk)
    with pytest.raises(atomic.WriteFailed):
        io.save_checkpoint({"state_dict": {"w": torch.ones(64 * 1024)}}, small_disk / "last.ckpt")
    assert torch.equal(read_checkpoint(small_disk / "last.ckpt")["state_dict"]["w"], torch.ones(4))
    module = RewardFineTuning(ClassifierObjective(target_class=7, path=str(tiny_digits_dir / "classifier")),
                              backbone=DigitsBackbone(str(tiny_digits_dir)), lora_rank=64)  # 64: a larger file
    with pytest.raises(atomic.WriteFailed) as info:
        module.export_adapter(small_disk / "lora")
    assert "No space left" in str(info.value) and clean_message(info.value) is not None
    assert {p.name: p.read_bytes() for p in (small_disk / "lora").iterdir()} == before


def test_a_full_disk_under_sdo_predict_ends_in_one_sentence(tiny_digits_dir, small_disk, tmp_path):
    """The run's folder on a full filesystem: whichever writer meets it first (here TensorBoard's,
    a library's) the command ends in one sentence, exit status 1."""
    config = write_config(tmp_path / "config.yaml", tiny_digits_dir)
    fill(small_disk, leave=2048)
    done = subprocess.run([sys.executable, "-m", "sdo_lightning.cli", "predict", "--config", str(config),
                           *evaluation_args(tiny_digits_dir), "--data.eval_samples", "2"],
                          cwd=small_disk, capture_output=True, text=True, timeout=300)
    # TensorBoard's writer thread prints its own traceback on a full disk, and its lines can land in
    # the middle of ours: find the sentence wherever it starts
    errors = re.findall(r"error: (WriteFailed: [^\n]*)", done.stderr)
    assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
    assert "No space left on device" in errors[0] and "free space" in errors[0]


# -- 6 and 7: damaged or NaN adapters ------------------------------------------------------------


@pytest.mark.parametrize("case", ["empty", "random", "truncated", "symlink", "nan"])
def test_a_damaged_adapter_is_one_sentence_for_predict_and_mix(case, fitted, tiny_digits_dir, tmp_path, capsys):
    root, config, _, adapter = fitted
    bad = tmp_path / "lora"
    shutil.copytree(adapter, bad)
    weights = bad / lora.WEIGHTS_NAME
    if case == "nan":
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        state[sorted(state)[0]] = torch.full_like(state[sorted(state)[0]], float("nan"))
        save_file(state, str(weights))
    else:
        damaged(weights, case, good=adapter / lora.WEIGHTS_NAME)
    message = one_sentence(["predict", "--config", str(config), "--model.adapter", str(bad),
                            *evaluation_args(tiny_digits_dir)], root)
    assert str(weights) in message
    assert ("NaN" in message) if case == "nan" else ("could not be read" in message)
    message = one_sentence(["mix", "--adapters", str(bad), "--digits", str(tiny_digits_dir), "--steps", "2",
                            "--out", str(tmp_path / "mix.png")])
    assert str(weights) in message and not (tmp_path / "mix.png").exists()


# -- 9: the peft layout loads with peft itself -----------------------------------------------------


def test_the_exported_adapter_loads_with_peft_from_pretrained(fitted, tiny_digits_dir):
    """``PeftModel.from_pretrained(unet, lora_dir)`` gives the adapted UNet's outputs (not the
    base model's), compared with the adapter's deltas added to the base weights by hand."""
    import warnings

    from diffusers import UNet2DModel
    from peft import PeftModel
    from safetensors.torch import load_file

    _, _, _, adapter = fitted
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([500, 100, 900]), torch.tensor([7, 3, 10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft warns about keys it could not load
        peft_model = PeftModel.from_pretrained(UNet2DModel.from_pretrained(tiny_digits_dir / "unet"), adapter)
    with torch.no_grad():
        through_peft = peft_model.base_model.model(x, t, class_labels=labels).sample
    # by hand: W + (alpha / r) * B A for every adapted layer, from the file's tensors
    manual = UNet2DModel.from_pretrained(tiny_digits_dir / "unet")
    base_out = manual(x, t, class_labels=labels).sample.detach()
    config = json.loads((adapter / lora.CONFIG_NAME).read_text())
    scale = config["lora_alpha"] / config["r"]
    state = load_file(str(adapter / lora.WEIGHTS_NAME))
    modules = dict(manual.named_modules())
    with torch.no_grad():
        for key in [k for k in state if k.endswith("lora_A.weight")]:
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a, b = state[key], state[key.replace("lora_A", "lora_B")]
            layer = modules[name]
            if a.dim() == 4:  # conv: B (out, r, 1, 1) after A (r, in, k, k)
                delta = torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
            else:
                delta = b @ a
            layer.weight += scale * delta
        by_hand = manual(x, t, class_labels=labels).sample
    assert (through_peft - base_out).abs().max() > 1e-4  # the adapter changes the outputs
    torch.testing.assert_close(through_peft, by_hand, atol=1e-5, rtol=1e-4)


# -- 7: nothing silently wrong -------------------------------------------------------------------


def test_predict_refuses_nan_images_from_a_checkpoint(fitted, tiny_digits_dir, tmp_path):
    root, config, ckpt, _ = fitted
    checkpoint = torch.load(ckpt, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if "lora_A" in k)
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    nan = tmp_path / "nan.ckpt"
    torch.save(checkpoint, nan)
    message = one_sentence(["predict", "--config", str(config), "--ckpt_path", str(nan),
                            *evaluation_args(tiny_digits_dir)], root)
    assert "NaN" in message and "seed 1000" in message


@pytest.mark.parametrize("option", [["--scales", "0", "nan"], ["--scales", "inf"], ["--weights", "nan"]])
def test_mix_refuses_non_finite_scales(option, fitted, tiny_digits_dir, tmp_path):
    _, _, _, adapter = fitted
    message = one_sentence(["mix", "--adapters", str(adapter), "--digits", str(tiny_digits_dir), *option,
                            "--out", str(tmp_path / "mix.png")])
    assert "finite" in message and option[0] in message and not (tmp_path / "mix.png").exists()


def test_an_adapter_and_a_checkpoint_together_say_which_wins(fitted, tiny_digits_dir, tmp_path, caplog):
    root, config, ckpt, adapter = fitted
    ev = evaluation_args(tiny_digits_dir)
    message = one_sentence(["predict", "--config", str(config), "--model.adapter", str(adapter), "--ckpt_path",
                            str(ckpt), *ev], root)
    assert "--model.adapter null" in message and "drop --ckpt_path" in message
    # a checkpoint of a fit that started from this adapter: the checkpoint's weights, said in one line
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["sdo_run"]["config"]["model.init_args.adapter"] = str(adapter)
    continued = tmp_path / "continued.ckpt"
    torch.save(checkpoint, continued)
    main(["predict", "--config", str(config), "--model.adapter", str(adapter), "--ckpt_path", str(continued), *ev,
          "--data.eval_samples", "2"])
    assert "using the checkpoint's adapter weights" in caplog.text


def test_the_model_card_keeps_the_base_model_signature_whatever_the_path(tmp_path):
    for base in ("DigitsBackbone(/data/a---b)", "DigitsBackbone(/data/a\n---\nb)", "x\n---\n\n---"):
        card = tmp_path / str(len(list(tmp_path.iterdir())))
        lora.write_model_card(card, {"base_model": base, "base_model_signature": "0123abcd"})
        front = lora.read_model_card(card)
        assert front["base_model"] == base and front["base_model_signature"] == "0123abcd"


def test_fid_and_kid_are_not_reported_for_too_few_rows(fitted, tiny_digits_dir, tmp_path, monkeypatch):
    root, config, _, _ = fitted
    monkeypatch.chdir(root)
    with pytest.warns(UserWarning, match="--data.eval_samples 4 or more"):
        main(["validate", "--config", str(config), "--ckpt_path", "last", *evaluation_args(tiny_digits_dir),
              "--data.eval_samples", "2"])
    metrics = json.loads((versions(root)[-1] / "val_metrics.json").read_text())
    assert "reward" in metrics and not {"fid", "kid", "pixel_fid"} & set(metrics)


# -- 8 and 11: odd arguments, one sentence each ----------------------------------------------------


@pytest.mark.parametrize("option,expected", [
    (["--num-samples", "0"], "--num-samples 0"), (["--out", "."], "directory"), (["--out", "m.txt"], "m.txt': .txt is not an image file type"),
    (["--steps", "0"], "--steps 0")])
def test_mix_edges_are_one_sentence(option, expected, fitted, tiny_digits_dir, tmp_path, monkeypatch):
    _, _, _, adapter = fitted
    monkeypatch.chdir(tmp_path)
    message = one_sentence(["mix", "--adapters", str(adapter), "--digits", str(tiny_digits_dir), *option])
    assert expected in message and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--data.eval_samples", "--data.num_samples"])
def test_huge_sample_counts_are_bounded(option, tiny_digits_dir, tmp_path):
    config = write_config(tmp_path / "config.yaml", tiny_digits_dir)
    message = one_sentence(["fit", "--config", str(config), option, str(10**12)], tmp_path)
    assert option.split(".")[-1] in message and "at most 1,000,000" in message


def error_line(argv, capsys, monkeypatch):
    from sdo_lightning.cli import console_main

    monkeypatch.setattr(sys, "argv", ["sdo", *argv])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code not in (0, None)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("case,expected", [
    ("latin1", "is not UTF-8 text"), ("empty", "is empty"), ("comments", "is empty"),
    ("duplicate", "'model.init_args.lr' is given twice"), ("list", "not a mapping")])
def test_bad_config_files_are_one_sentence_naming_the_file(case, expected, tiny_digits_dir, tmp_path, capsys,
                                                            monkeypatch):
    good = write_config(tmp_path / "good.yaml", tiny_digits_dir).read_text()
    bad = tmp_path / f"{case}.yaml"
    if case == "latin1":
        bad.write_bytes(good.replace("seed_everything: 0", "# caf\u00e9\nseed_everything: 0").encode("latin-1"))
    elif case == "empty":
        bad.write_text("")
    elif case == "comments":
        bad.write_text("# nothing yet\n")
    elif case == "duplicate":
        bad.write_text(good.replace("lr: 0.05", "lr: 0.05\n    lr: 0.5"))
    elif case == "list":
        bad.write_text("- model\n- data\n")
    monkeypatch.chdir(tmp_path)
    line = error_line(["fit", "--config", str(bad)], capsys, monkeypatch)
    assert expected in line and str(bad) in line


@pytest.mark.parametrize("option,expected", [
    (["--seed_everything", "abc"], "expected an integer seed from 0 to 4294967295"),
    (["--seed_everything", str(2**70)], "out of range: give a seed from 0 to 4294967295"),
    (["--model.solver", "DDIM", "--model.target", "x_q"], None),
    (["--trainer.callbacks", "os.path.join"], "is not a Lightning Callback class; give its full class path"),
    (["--model.optimizer", "os.path.join"], "is not an optimizer class; give its full class path"),
])
def test_odd_options_are_one_sentence_naming_the_fix(option, expected, tiny_digits_dir, tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "config.yaml", tiny_digits_dir)
    if option[-1] == "x_q":  # target is LatentOptimization's
        config = HERE.parent / "configs" / "quickstart.yaml"
        expected = "'x_q' is not a known optimization target; known: ConditionEmbedding, IntermediateLatent, StartNoise"
        monkeypatch.setattr("sdo_lightning.digits.WEIGHTS_DIR", tiny_digits_dir)
    monkeypatch.chdir(tmp_path)
    line = error_line(["fit", "--config", str(config), *option], capsys, monkeypatch)
    assert expected in line


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["predict", "-h"]])
def test_help_imports_no_plugin(argv, tmp_path, monkeypatch, capsys):
    from importlib import metadata

    from sdo_lightning import registry

    marker = tmp_path / "imported"
    (tmp_path / "sdo_help_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sdo_help_plugin", raising=False)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group=None: [
        metadata.EntryPoint("Slow", "sdo_help_plugin:Slow", group)] if group == "sdo_lightning.objectives" else [])
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.delenv(registry.DISABLE_ENV, raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0 and "usage:" in capsys.readouterr().out
    assert not marker.exists()
    with pytest.warns(UserWarning, match="sdo_help_plugin"):  # the same fake plugin loads for a real command
        registry.load_plugins()
    assert marker.exists()
    sys.modules.pop("sdo_help_plugin", None)


# -- 10: a resumed Picard run starts warm where the interrupted one would have ------------------


def test_a_resumed_picard_run_equals_the_uninterrupted_one(tiny_digits_dir, tmp_path):
    """Picard at its default tolerance (0.1) reaches latents within the tolerance of sequential
    sampling, and which ones depends on the warm start: the checkpoint holds the trajectories, so
    a run resumed at step 2 ends where the uninterrupted 4-step run ends."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.modules.latent_optimization import LatentOptimization
    from sdo_lightning.objectives import ClassifierObjective
    from sdo_lightning.sampling.picard import Picard
    from sdo_lightning.solvers import DDIM

    def run(steps, ckpt_path=None, callbacks=()):
        module = LatentOptimization(objective=ClassifierObjective(str(tiny_digits_dir / "classifier"), 3),
                                    backbone=DigitsBackbone(tiny_digits_dir), solver=Picard(DDIM(8), window=4),
                                    lr=0.3, seed=1)
        trainer = Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=tmp_path, accelerator="cpu", callbacks=list(callbacks),
                          enable_checkpointing=bool(callbacks))
        trainer.fit(module, datamodule=SampleSet(num_samples=3, class_label=[1, 2, 5]), ckpt_path=ckpt_path)
        return module

    straight = run(4)
    run(2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="step2", every_n_train_steps=2)])
    saved = torch.load(tmp_path / "ckpt" / "step2.ckpt", weights_only=True)
    assert len(saved["picard_trajectories"]["outputs"]) == 3  # one per sample
    resumed = run(4, ckpt_path=tmp_path / "ckpt" / "step2.ckpt")
    assert resumed.solver.last.warm == 3
    torch.testing.assert_close(resumed.variable, straight.variable, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.best_images, straight.best_images, rtol=0, atol=1e-6)
