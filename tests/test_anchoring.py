"""Anchoring RewardFineTuning to the base model (issue 23, item 1): the KL penalty at the kept
calls, the window of calls that may keep a graph, checkpoint selection on a held-out metric."""

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from safetensors.torch import load_file

from sdo_lightning import Objective, lora
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.data import SampleSet
from sdo_lightning.gradient_modes import DRTune, FullBackprop, ShortcutGradient, TruncatedBackprop
from sdo_lightning.reward_finetuning import RewardFineTuning
from sdo_lightning.solvers import DDIM

MODES = {
    "sdo": lambda: ShortcutGradient(),
    "full": lambda: FullBackprop(),
    "alignprop_uniform": lambda: TruncatedBackprop(random_k=True),
    "drtune": lambda: DRTune(k=2),
}


class Darkness(Objective, register=False):
    def forward(self, images, batch):
        return images.flatten(1).mean(1)


class Brightness(Objective, register=False):
    """The opposite of Darkness: a held-out metric that gets worse as the trained one improves."""

    def forward(self, images, batch):
        return 1 - images.flatten(1).mean(1)


def alphas_cumprod_squaredcos(num_train_timesteps=1000):
    """alpha_bar_t of the 'squaredcos_cap_v2' schedule (Nichol & Dhariwal 2021), written out here,
    held in float32 as a model's schedule is (near t = 0, 1 - alpha_bar_t/alpha_bar_prev cancels:
    a float64 schedule would differ from the model's own by ~1e-3 there)."""
    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_train_timesteps) / f(i / num_train_timesteps), 0.999)
             for i in range(num_train_timesteps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float32), 0).tolist()


def ddim_mean_and_sigma(eps, x, t, prev_t, eta, abar):
    """DDIM (Song et al. 2021, Eq. 12 and 16) posterior mean for a noise prediction ``eps``, and sigma_t."""
    a_t = abar[t]
    a_prev = abar[prev_t] if prev_t >= 0 else 1.0  # a schedule that ends at alpha_bar = 1
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps, sigma


def spy_on_kept_calls(backbone):
    """Record (x, t, cond, output) of every network call made with grad enabled (the kept ones)."""
    calls = []
    plain = backbone.denoise

    def spy(x, t, cond):
        out = plain(x, t, cond)
        if torch.is_grad_enabled():
            calls.append((x.detach().clone(), t, cond, out.detach().clone()))
        return out

    backbone.denoise = spy
    return calls


def randomize_adapters(module, seed=3, scale=0.2):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in module.lora_params:  # B starts at 0: make the adapters change the output
            p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("eta", [0.6, 0.0], ids=["eta0.6_kl", "eta0_output_penalty"])
@pytest.mark.parametrize("mode", ["full", "drtune"])
def test_anchor_is_the_closed_form_kl_of_the_two_ddim_kernels(eta, mode, tiny_digits_dir):
    """Per sample, the anchor equals the sum over the kept calls of KL(N(mu_adapted, s^2) || N(mu_base, s^2))
    = ||mu1 - mu2||^2 / (2 s^2), each mu the DDIM posterior mean of one network output and s from eta,
    the base output computed here by a separate adapter-free copy of the model. A step without noise
    (eta 0, or the last step, where alpha_bar_prev = 1) has no KL: there the anchor is ||u1 - u2||^2 / 2."""
    n = 4
    module = RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(n, eta=eta),
                              gradient_mode=MODES[mode](), kl_weight=1.0)
    randomize_adapters(module)
    calls = spy_on_kept_calls(module.backbone)
    batch = {"index": torch.arange(3), "class_label": torch.full((3,), 10)}
    module.generate(batch, grad=True)
    anchor = module.anchor_kl
    assert anchor.shape == (3,) and anchor.requires_grad

    base = DigitsBackbone(tiny_digits_dir)  # never had adapters
    abar = alphas_cumprod_squaredcos()
    expected = torch.zeros(3, dtype=torch.float64)
    assert calls, "no call kept its graph"
    for x, t, cond, out in calls:
        with torch.no_grad():
            ref = base.denoise(x, t, cond)
        t = int(t)
        prev_t = t - 1000 // n
        x, out, ref = x.double(), out.double(), ref.double()
        mu_1, sigma = ddim_mean_and_sigma(out, x, t, prev_t, eta, abar)
        mu_2, _ = ddim_mean_and_sigma(ref, x, t, prev_t, eta, abar)
        if sigma > 0:
            expected += ((mu_1 - mu_2) ** 2).flatten(1).sum(1) / (2 * sigma ** 2)
        else:
            expected += 0.5 * ((out - ref) ** 2).flatten(1).sum(1)
    assert expected.min() > 1e-3  # the adapters changed the outputs: the check has something to compare
    torch.testing.assert_close(anchor.double().detach(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kl_weight", [1.0, 0.0])
def test_anchor_gradient_pulls_the_adapters_towards_the_base_model(kl_weight, tiny_digits_dir, tmp_path):
    """With nothing else to optimize, steps on the anchor alone bring the adapted outputs back
    towards the base model's (measured by an independent comparison of the two networks); without
    the anchor nothing moves."""
    class Nothing(Objective, register=False):
        def forward(self, images, batch):
            return images.flatten(1).sum(1) * 0

    module = RewardFineTuning(objective=Nothing(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(4, eta=1.0),
                              gradient_mode=ShortcutGradient(), kl_weight=kl_weight, lr=0.05, weight_decay=0.0)
    randomize_adapters(module, scale=0.3)
    base = DigitsBackbone(tiny_digits_dir)
    x, t, cond = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500), torch.full((4,), 10)

    def gap():
        with torch.no_grad():
            return float((module.backbone.denoise(x, t, cond) - base.denoise(x, t, cond)).pow(2).mean())

    before = gap()
    Trainer(max_steps=20, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=tmp_path).fit(module, datamodule=SampleSet(num_samples=4))
    if kl_weight:
        assert gap() < 0.5 * before
    else:
        assert gap() == pytest.approx(before, rel=1e-6)


@pytest.mark.parametrize("mode", list(MODES))
def test_anchor_and_window_fit_with_every_gradient_mode(mode, tiny_digits_dir, tmp_path):
    module = RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(6, eta=0.5),
                              gradient_mode=MODES[mode](), kl_weight=0.5, kept_fraction=(0.3, 0.8), lr=0.05)
    before = [p.detach().clone() for p in module.lora_params]
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=SampleSet(num_samples=2))
    assert math.isfinite(float(trainer.callback_metrics["train/anchor_kl"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, module.lora_params))


# -- the window of kept calls --------------------------------------------------------------------
# DDIM with 10 steps on a 1000-step schedule ("leading" spacing, offset 0) visits these timesteps:
TEN_STEPS = [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]


def kept_timesteps_of(module, trajectories):
    calls = spy_on_kept_calls(module.backbone)
    per_trajectory = []
    for _ in range(trajectories):
        calls.clear()
        module.generate({"index": torch.arange(1), "class_label": torch.full((1,), 10)}, grad=True)
        per_trajectory.append([int(t) for _, t, _, _ in calls])
    return per_trajectory


@pytest.mark.parametrize("mode", ["sdo", "drtune", "alignprop_uniform", "full"])
@pytest.mark.parametrize("window", [{"kept_timesteps": (300, 700)}, {"kept_fraction": (0.25, 0.75)}],
                         ids=["timesteps", "fraction"])
def test_kept_calls_lie_in_the_window(mode, window, tiny_digits_dir):
    if "kept_timesteps" in window:
        allowed = [t for t in TEN_STEPS if 300 <= t <= 700]  # 700 .. 300
    else:
        allowed = [t for i, t in enumerate(TEN_STEPS) if 0.25 <= i / 10 < 0.75]  # calls 3..7: 600 .. 200
    module = RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(10),
                              gradient_mode=MODES[mode](), **window)
    kept = kept_timesteps_of(module, 40 if mode == "sdo" else 12)
    assert all(kept_one and set(kept_one) <= set(allowed) for kept_one in kept), kept
    seen = set().union(*map(set, kept))
    if mode == "sdo":  # one call per trajectory, drawn from the whole window
        assert all(len(k) == 1 for k in kept) and seen == set(allowed)
    if mode == "drtune":  # k=2 over the window's 5 calls: stride 2 from offset 0 or 1
        assert all(k in ([allowed[0], allowed[2]], [allowed[1], allowed[3]]) for k in kept), kept
    if mode == "full":
        assert all(k == allowed for k in kept)
    if mode == "alignprop_uniform":  # the window's last K calls
        assert all(k == allowed[len(allowed) - len(k):] for k in kept)


@pytest.mark.parametrize("kwargs, message", [
    ({"kl_weight": -0.1}, "kl_weight must be a finite number >= 0"),
    ({"kl_weight": float("nan")}, "kl_weight must be a finite number >= 0"),
    ({"kept_timesteps": (2000, 3000)}, "lies outside the schedule"),
    ({"kept_timesteps": (810, 890)}, "holds none of the 10 timesteps"),
    ({"kept_timesteps": (700, 300)}, "is empty"),
    ({"kept_fraction": (0.5, 0.5)}, "is not a window of the chain"),
    ({"kept_fraction": (-0.2, 0.5)}, "is not a window of the chain"),
    ({"kept_fraction": (0.51, 0.59)}, "holds none of the chain's 10 calls"),
    ({"kept_fraction": (0.2, 0.5), "kept_timesteps": (0, 500)}, "give one of them"),
])
def test_bad_anchoring_settings_are_one_sentence(kwargs, message, tiny_digits_dir):
    with pytest.raises(ValueError, match=message) as info:
        RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(10), **kwargs)
    text = str(info.value)
    assert "\n" not in text and text.endswith(".")


@pytest.mark.parametrize("callback, eval_samples, message", [
    (ModelCheckpoint(monitor="val/held_ot"), 2, "never logs"),
    (EarlyStopping(monitor="held_out"), 2, "never logs"),
    (ModelCheckpoint(monitor="val/held_out"), 0, "does not validate"),
    (EarlyStopping(monitor="train/anchor_kl"), 2, "never logs"),  # kl_weight 0: no anchor is logged
])
def test_a_monitor_of_a_metric_never_logged_is_refused_before_sampling(callback, eval_samples, message,
                                                                     tiny_digits_dir, tmp_path):
    module = RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(3),
                              held_out_objective=Brightness())
    calls = []
    plain = module.backbone.denoise
    module.backbone.denoise = lambda *a: calls.append(1) or plain(*a)
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback])
    with pytest.raises(ValueError, match=message) as info:
        trainer.fit(module, datamodule=SampleSet(num_samples=2, eval_samples=eval_samples, eval_batch_size=2))
    assert not calls  # refused before any network call
    assert "\n" not in str(info.value)


# -- checkpoint selection -------------------------------------------------------------------------
class RecordValidations(Callback):
    """An independent record of each validation: its step, val/held_out and the adapters then."""

    def __init__(self):
        self.rows = []

    def on_validation_end(self, trainer, module):
        adapters = {k: v.clone() for k, v in lora.lora_state_dict(module.backbone.network).items()}
        self.rows.append((trainer.global_step, float(trainer.callback_metrics["val/held_out"]), adapters))


def test_exported_adapter_is_the_checkpoint_selected_on_the_held_out_metric(tiny_digits_dir, tmp_path):
    module = RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(3), lr=0.05,
                              held_out_objective=Brightness())
    record = RecordValidations()
    trainer = Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, val_check_interval=1,
                      num_sanity_val_steps=0,
                      # Lightning saves at the epoch's end when val_check_interval == 1.0: here, after each validation
                      callbacks=[ModelCheckpoint(monitor="val/held_out", mode="min", save_last=True,
                                                 save_on_train_epoch_end=False), record])
    trainer.fit(module, datamodule=SampleSet(num_samples=3, eval_samples=4, eval_batch_size=4))
    steps, scores, adapters = zip(*record.rows)
    assert list(steps) == [1, 2, 3, 4]
    best = min(range(len(scores)), key=scores.__getitem__)
    assert steps[best] != 4, scores  # the check means something only if the best is not the last step
    raw = load_file(str(tmp_path / "lora" / lora.WEIGHTS_NAME))
    assert all(k.startswith("base_model.model.") for k in raw)  # peft's layout (PeftModel.from_pretrained loads it)
    exported = {k[len("base_model.model."):]: v for k, v in raw.items()}
    assert exported.keys() == adapters[best].keys()
    for key, value in adapters[best].items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=0)
    assert any(not torch.equal(exported[k], v) for k, v in adapters[-1].items())
    card = lora.read_model_card(tmp_path / "lora")
    assert card["steps"] == steps[best] and card["final_step"] == 4
    assert card["selected_by"] == "val/held_out (min)" and card["selected_score"] == pytest.approx(scores[best])
    assert card["validation"]["held_out"] == pytest.approx(scores[best])
    assert f"step {steps[best]} of 4" in (tmp_path / "lora" / "README.md").read_text()
    # the module keeps the last step's adapters, as Lightning leaves a fitted module
    for key, value in lora.lora_state_dict(module.backbone.network).items():
        torch.testing.assert_close(value, adapters[-1][key], rtol=0, atol=0)


def test_early_stopping_on_the_held_out_metric_stops_the_fit(tiny_digits_dir, tmp_path):
    module = RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(3), lr=0.05,
                              held_out_objective=Brightness())
    record = RecordValidations()
    trainer = Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, val_check_interval=1,
                      num_sanity_val_steps=0,
                      # Lightning checks at the epoch's end when val_check_interval == 1.0: here, after each validation
                      callbacks=[EarlyStopping(monitor="val/held_out", mode="min", patience=2,
                                               check_on_train_epoch_end=False), record])
    trainer.fit(module, datamodule=SampleSet(num_samples=3, eval_samples=4, eval_batch_size=4))
    scores = [score for _, score, _ in record.rows]
    # independent: the first validation after which `patience` validations in a row did not improve
    best, waited, stop = scores[0], 0, None
    for i, score in enumerate(scores[1:], start=1):
        if score < best:
            best, waited = score, 0
        else:
            waited += 1
            if waited >= 2:
                stop = i
                break
    assert stop is not None and trainer.global_step == stop + 1 < 8


def test_anchored_config_runs_from_yaml_and_exports_the_selected_adapter(tiny_weights, tmp_path, monkeypatch):
    from pathlib import Path

    from sdo_lightning.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "digits" / "finetune_lora_anchored.yaml"
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(config), "--trainer.max_steps", "3", "--trainer.val_check_interval", "1",
                "--model.solver.num_inference_steps", "4", "--data.num_samples", "2", "--data.eval_samples", "2",
                "--data.eval_batch_size", "2", "--model.evaluation.kid_subset_size", "2",
                "--trainer.enable_progress_bar", "false"])
    module = cli.model
    assert module.kl_weight > 0 and module.kept_window is not None
    card = lora.read_model_card(Path(cli.trainer.log_dir) / "lora")
    assert card["selected_by"].startswith("val/") and 1 <= card["steps"] <= card["final_step"] == 3
