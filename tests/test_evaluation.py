"""Evaluation: the metrics against independent computations, and `sdo fit` with validation ->
`sdo validate` -> `sdo predict` on a tiny digits model (adapter round trip, model card, bad input)."""

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from sdo_lightning import lora
from sdo_lightning.cli import clean_message, main
from sdo_lightning.evaluation.metrics import ClassifierFeatures, SampleMetrics

torch.set_num_threads(1)


# -- metrics against closed forms ---------------------------------------------------------------


class Gaussian(nn.Module):
    """Features ``mean_k + L_k z`` with ``z = Phi^-1(channel 0)`` and ``k`` = channel 1 (0 or 1):
    images of uniform pixels become N(mean_k, L_k L_k^T) features, so each set's feature
    distribution is known in closed form."""

    def __init__(self, means, chols):
        super().__init__()
        self.register_buffer("means", torch.as_tensor(np.array(means), dtype=torch.float64))
        self.register_buffer("chols", torch.as_tensor(np.array(chols), dtype=torch.float64))
        self.num_features = self.means.shape[1]

    def forward(self, images):
        z = torch.special.ndtri(images[:, 0].flatten(1).double().clamp(1e-9, 1 - 1e-9))
        k = images[:, 1, 0, 0].round().long()
        return self.means[k] + torch.einsum("nij,nj->ni", self.chols[k], z)


def frechet(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_is_the_frechet_distance_of_the_feature_sets_and_of_their_gaussians():
    g = torch.Generator().manual_seed(0)
    n, d = 3000, 3
    means = [np.zeros(d), np.array([0.5, -0.2, 0.1])]
    chols = [np.eye(d), np.array([[1.5, 0, 0], [0.3, 0.8, 0], [0, 0.2, 1.1]])]
    features = Gaussian(means, chols)
    real = torch.cat([torch.rand(n, 1, 1, d, generator=g), torch.zeros(n, 1, 1, d)], dim=1)
    fake = torch.cat([torch.rand(n, 1, 1, d, generator=g), torch.ones(n, 1, 1, d)], dim=1)
    metrics = SampleMetrics(features)
    for rows in torch.arange(n).split(1000):  # accumulated over batches
        metrics.update(fake[rows], real[rows])
    fid = metrics.compute()["fid"]
    f, r = features(fake).numpy(), features(real).numpy()
    empirical = frechet(f.mean(0), np.cov(f, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    assert fid == pytest.approx(empirical, rel=1e-6)
    population = frechet(means[1], chols[1] @ chols[1].T, means[0], chols[0] @ chols[0].T)
    assert fid == pytest.approx(population, rel=0.1)  # the sampling error of 3000 draws
    assert metrics.compute()["fid"] == fid


def test_pixel_fid_is_the_frechet_distance_of_the_pixels():
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(60, 1, 3, 3, generator=g), torch.rand(60, 1, 3, 3, generator=g) ** 2
    metrics = SampleMetrics(None)
    metrics.update(x, y)
    a, b = x.flatten(1).double().numpy(), y.flatten(1).double().numpy()
    expected = frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert metrics.compute()["pixel_fid"] == pytest.approx(expected, rel=1e-6)


def test_psnr_ssim_diversity_and_reward_against_hand_computations():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(5, 1, 16, 16, generator=g), torch.rand(5, 1, 16, 16, generator=g)
    metrics = SampleMetrics(None)
    losses = torch.rand(5, generator=g)
    metrics.update(x, y, losses=losses)
    out = metrics.compute()
    mse = float(((x.double() - y.double()) ** 2).mean())
    assert out["psnr"] == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
    assert out["reward"] == pytest.approx(-float(losses.mean()), rel=1e-6)
    flat = x.flatten(1).double().numpy()
    pairs = [np.linalg.norm(flat[i] - flat[j]) for i in range(5) for j in range(i + 1, 5)]
    assert out["diversity"] == pytest.approx(np.mean(pairs), rel=1e-9)
    # SSIM: identical images 1; constant images a and b: (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2
    metrics.reset()
    metrics.update(x, x)
    assert metrics.compute()["ssim"] == pytest.approx(1.0, abs=1e-6)
    a, b, c1 = 0.3, 0.7, 0.01 ** 2
    metrics.reset()
    metrics.update(torch.full((2, 1, 16, 16), a), torch.full((2, 1, 16, 16), b))
    # (float32 local variances E[x^2] - E[x]^2 of a constant are ~1e-7, not 0, against C2 = 9e-4)
    assert metrics.compute()["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-3)


def test_classifier_features_are_the_penultimate_activations(tiny_digits_dir):
    features = ClassifierFeatures(str(tiny_digits_dir / "classifier"))
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    c = features.classifier
    hidden = torch.nn.functional.silu(c.head[1](c.features(images).flatten(1)))
    torch.testing.assert_close(features(images), hidden)
    torch.testing.assert_close(c.head[3](features(images)), c(images))
    assert features.num_features == hidden.shape[1]


# -- fit (validating) -> validate -> predict on a tiny digits model --------------------------------


def write_config(path: Path, weights: Path, lr: float = 0.05) -> Path:
    path.write_text(textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          max_steps: 2
          accelerator: cpu
          enable_progress_bar: false
          val_check_interval: 1
        model:
          class_path: RewardFineTuning
          init_args:
            objective: {{class_path: ClassifierObjective, init_args: {{target_class: 7, path: {weights}/classifier}}}}
            backbone: {{class_path: DigitsBackbone, init_args: {{path: {weights}}}}}
            solver: {{class_path: DDIM, init_args: {{num_inference_steps: 3}}}}
            lr: {lr}
        data:
          class_path: SampleSet
          init_args: {{num_samples: 2, eval_samples: 4, eval_batch_size: 3}}
        """))
    return path


def evaluation_args(weights):
    return ["--model.evaluation.features", str(weights / "classifier"), "--model.evaluation.kid_subset_size", "3"]


def fit_in(root, tiny_digits_dir):
    """Run the 2-step fit of :func:`write_config` with ``root`` as the working directory; its config."""
    config = write_config(root / "config.yaml", tiny_digits_dir)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", "--config", str(config), *evaluation_args(tiny_digits_dir)])
    finally:
        os.chdir(cwd)
    return config


@pytest.fixture(scope="module")
def run(tiny_digits_dir, tmp_path_factory):
    """A finished 2-step fit, validated after every step, in a folder of its own."""
    root = tmp_path_factory.mktemp("evaluation")
    return root, fit_in(root, tiny_digits_dir)


def versions(root):
    return sorted((root / "runs" / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def test_fit_validates_every_step_and_the_model_card_and_hparams_record_it(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = run
    fit_dir = versions(root)[0]
    events = EventAccumulator(str(fit_dir))
    events.Reload()
    assert [e.step for e in events.Scalars("val/fid")] == [0, 1]
    assert [e.step for e in events.Images("val/samples")] == [0, 1]  # the same seeds at every validation
    assert "hp/fid" in events.Tags()["scalars"] and "hp_metric" not in events.Tags()["scalars"]
    hparams = events.PluginTagToContent("hparams")  # TensorBoard's HParams tab: settings and metrics
    assert b"hp/fid" in hparams["_hparams_/experiment"] and b"lora_rank" in hparams["_hparams_/session_start_info"]
    card = lora.read_model_card(fit_dir / "lora")
    assert card["base_model"].startswith("DigitsBackbone(") and card["lora_rank"] == 4 and card["steps"] == 2
    assert card["reward"] == "ClassifierObjective" and card["gradient_mode"] == "ShortcutGradient"
    assert card["solver"] == "DDIM" and card["solver_steps"] == 3
    last_fid = events.Scalars("val/fid")[-1].value
    assert card["validation"]["fid"] == pytest.approx(last_fid, rel=1e-5)


def test_validation_during_fit_leaves_the_training_unchanged(tiny_digits_dir, tmp_path):
    from lightning.pytorch import Trainer

    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.evaluation.metrics import Evaluation
    from sdo_lightning.objectives import ClassifierObjective
    from sdo_lightning.modules.reward_finetuning import RewardFineTuning
    from sdo_lightning.solvers import DDIM

    adapters = []
    for eval_samples in (0, 3):
        torch.manual_seed(0)  # augmenting objective: draws from the global generator every step
        module = RewardFineTuning(ClassifierObjective(str(tiny_digits_dir / "classifier"), 7, augment=2),
                                  DigitsBackbone(tiny_digits_dir), DDIM(3), lr=0.05,
                                  evaluation=Evaluation(str(tiny_digits_dir / "classifier"), kid_subset_size=2))
        trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                          val_check_interval=1, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=SampleSet(num_samples=2, eval_samples=eval_samples))
        adapters.append([p.detach().clone() for p in module.lora_params])
        assert ("val/reward" in trainer.callback_metrics) == bool(eval_samples)
    assert all(torch.equal(a, b) for a, b in zip(*adapters))


def hand_sampled(weights, adapter_dir, seeds, steps=3, label=10):
    """DDIM by hand with diffusers' scheduler, on a UNet with the adapter loaded by peft directly."""
    from diffusers import DDIMScheduler, UNet2DModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    unet = UNet2DModel.from_pretrained(weights / "unet")
    if adapter_dir is not None:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        inject_adapter_in_model(LoraConfig(**{k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}),
                                unet)
        # the file has PeftModel's keys; this UNet is not wrapped in one
        state = load_file(str(adapter_dir / "adapter_model.safetensors"))
        set_peft_model_state_dict(unet, {k.removeprefix("base_model.model."): v for k, v in state.items()})
    scheduler = DDIMScheduler.from_pretrained(weights / "scheduler", clip_sample=False)
    scheduler.set_timesteps(steps)
    x = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    labels = torch.full((len(seeds),), label)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, eta=0.0).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


def test_validate_and_predict_read_the_fit_and_predict_equals_hand_sampling(run, tiny_digits_dir, monkeypatch):
    root, config = run
    monkeypatch.chdir(root)
    main(["validate", "--config", str(config), "--ckpt_path", "last", *evaluation_args(tiny_digits_dir)])
    metrics = json.loads((versions(root)[-1] / "val_metrics.json").read_text())
    assert {"reward", "fid", "kid", "ssim", "psnr", "diversity", "class_entropy"} <= set(metrics)
    main(["test", "--config", str(config), "--ckpt_path", "last", *evaluation_args(tiny_digits_dir)])
    assert json.loads((versions(root)[-1] / "test_metrics.json").read_text()) == metrics  # the same rows
    main(["predict", "--config", str(config), "--ckpt_path", "last", *evaluation_args(tiny_digits_dir),
          "--data.eval_samples", "3", "--data.eval_seed", "5"])
    out = versions(root)[-1]
    saved = np.load(out / "predictions.npz")
    assert (out / "predict_grid.png").is_file() and saved["seed"].tolist() == [5, 6, 7]
    adapter = versions(root)[0] / "lora"
    expected = hand_sampled(tiny_digits_dir, adapter, [5, 6, 7])
    np.testing.assert_allclose(saved["images"], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(saved["base"], hand_sampled(tiny_digits_dir, None, [5, 6, 7]).numpy(), atol=1e-5)
    assert np.abs(saved["images"] - saved["base"]).max() > 1e-4  # the adapter changed the samples
    # the exported directory alone, without the checkpoint
    # and the base model's samples of another class as the reference
    main(["predict", "--config", str(config), "--model.adapter", str(adapter), *evaluation_args(tiny_digits_dir),
          "--data.eval_samples", "3", "--data.eval_seed", "5", "--data.eval_reference_class_label", "7"])
    saved = np.load(versions(root)[-1] / "predictions.npz")
    np.testing.assert_allclose(saved["images"], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(saved["base"], hand_sampled(tiny_digits_dir, None, [5, 6, 7], label=7).numpy(), atol=1e-5)


# -- bad input: one sentence each ---------------------------------------------------------------


def one_sentence(args, cwd):
    os.chdir(cwd)
    with pytest.raises(Exception) as info:
        main(args)
    message = clean_message(info.value)
    assert message is not None, f"not reported as bad input: {info.value!r}"
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def other_model(tmp_path_factory):
    from conftest import build_tiny_digits

    return build_tiny_digits(tmp_path_factory.mktemp("other_digits"), seed=1)


def test_bad_input_ends_in_one_sentence(run, tiny_digits_dir, other_model, tmp_path, monkeypatch):
    root, config = run
    monkeypatch.chdir(root)
    other = write_config(tmp_path / "other.yaml", other_model)
    ckpt = versions(root)[0] / "checkpoints" / "last.ckpt"
    adapter = versions(root)[0] / "lora"
    ev = evaluation_args(tiny_digits_dir)
    # a checkpoint of another base model: found by `last`, or given by path
    assert "is of this run" in one_sentence(["predict", "--config", str(other), "--ckpt_path", "last", *ev], root)
    message = one_sentence(["predict", "--config", str(other), "--ckpt_path", str(ckpt), *ev], root)
    assert "another model" in message and "backbone" in message
    # an adapter of another base model, or of another rank
    assert "another base model" in one_sentence(["predict", "--config", str(other), "--model.adapter", str(adapter),
                                                 *ev], root)
    assert "lora_rank" in one_sentence(["predict", "--config", str(config), "--model.adapter", str(adapter),
                                        "--model.lora_rank", "2", *ev], root)
    assert "not a directory" in one_sentence(["predict", "--config", str(config), "--model.adapter",
                                              str(tmp_path / "nothing"), *ev], root)
    # an empty evaluation set
    assert "--data.eval_samples" in one_sentence(["predict", "--config", str(config), "--data.eval_samples", "0",
                                                  *ev], root)
    assert "eval_samples must be >= 0" in one_sentence(["validate", "--config", str(config), "--data.eval_samples",
                                                        "-1", *ev], root)
    # a metric whose weights are not there
    assert "no digits classifier" in one_sentence(["validate", "--config", str(config), "--model.evaluation.features",
                                                   str(tmp_path / "missing")], root)
    missing = one_sentence(["validate", "--config", str(config), *ev, "--model.evaluation.lpips", "LPIPSFidelity",
                            "--model.evaluation.lpips.vgg_weights", str(tmp_path / "vgg16.pth"),
                            "--model.evaluation.lpips.lpips_weights", str(tmp_path / "vgg.pth")], root)
    assert "vgg16.pth" in missing


def test_prompts_missing_for_a_text_model_is_one_sentence(tmp_path):
    from sdo_lightning.backbones.base import TextConditionedBackbone
    from sdo_lightning.modules.reward_finetuning import RewardFineTuning

    module = RewardFineTuning.__new__(RewardFineTuning)
    nn.Module.__init__(module)
    module.backbone = TextConditionedBackbone.__new__(type("TinyText", (TextConditionedBackbone,), {
        "network": None, "encode_condition": None, "denoise": None}, register=False))
    with pytest.raises(ValueError, match="eval_prompts"):
        module.generate_for_eval({"index": torch.arange(2), "seed": torch.arange(2)})


def test_auto_features_skip_fid_for_colour_images_and_digits_features_refuse_them(tiny_weights):
    from sdo_lightning.evaluation.metrics import Evaluation

    with pytest.warns(UserWarning, match="FID and KID are skipped"):
        assert Evaluation().build(channels=3).fid is None
    assert isinstance(Evaluation().build(channels=1).features, ClassifierFeatures)
    with pytest.raises(ValueError, match="features: null"):
        Evaluation(features="digits").build().update(torch.rand(2, 3, 16, 16), None)


def test_clip_score_is_100_times_the_clipped_cosine_of_the_saved_clip(tmp_path):
    from transformers import CLIPModel, CLIPTokenizer

    from sdo_lightning.evaluation.metrics import load_clip_score
    from sdo_lightning.testing.tiny_models import build_tiny_clip

    root = build_tiny_clip(tmp_path / "clip")
    metrics = SampleMetrics(None, clip_score=load_clip_score(str(root)))
    g = torch.Generator().manual_seed(4)
    images, prompts = torch.rand(4, 3, 32, 32, generator=g), ["a cat", "a dog", "a red car", "a dog"]
    for rows in (slice(0, 3), slice(3, 4)):
        metrics.update(images[rows], images[rows].flip(0), batch={"prompt": prompts[rows]})
    # by hand: 32 px is the tower's size (no resize or crop), OpenAI CLIP's normalization
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    model = CLIPModel.from_pretrained(root).eval()
    tokens = CLIPTokenizer.from_pretrained(root)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=(images - mean) / std).pooler_output)
        txt = model.text_projection(model.text_model(**tokens).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert metrics.compute()["clip_score"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-4)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_clip_score(str(tmp_path / "none"))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")
def test_validation_on_two_processes_equals_one(tiny_digits_dir, tmp_path, monkeypatch):
    """DDP (gloo, forked): shards of 3 and 2 rows, in 2 and 1 batches; every synced number equals
    the 1-process run's (KID too, whose per-batch feature lists are gathered as one tensor)."""
    import socket

    from lightning.pytorch import Trainer

    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.evaluation.metrics import Evaluation
    from sdo_lightning.objectives import ClassifierObjective
    from sdo_lightning.modules.reward_finetuning import RewardFineTuning
    from sdo_lightning.solvers import DDIM

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    results = []
    for kw in (dict(devices=1), dict(devices=2, strategy="ddp_fork")):
        torch.manual_seed(0)
        module = RewardFineTuning(ClassifierObjective(str(tiny_digits_dir / "classifier"), 7),
                                  DigitsBackbone(tiny_digits_dir), DDIM(3),
                                  evaluation=Evaluation(str(tiny_digits_dir / "classifier")))
        with torch.no_grad():
            for p in module.lora_params:
                p.normal_(0, 0.3)  # an adapter that changes the samples
        out = tmp_path / str(kw["devices"])
        Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=out, **kw).validate(module, SampleSet(num_samples=2, eval_samples=5, eval_batch_size=2))
        results.append(json.loads((out / "val_metrics.json").read_text()))
    assert results[0].keys() == results[1].keys() and "kid" in results[0]
    for key, value in results[0].items():
        assert results[1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_the_model_card_keeps_small_metrics_exactly(tmp_path):
    """The card's front matter reads back every metric bit for bit (a 6-decimal rounding lost 0.0295684)."""
    metrics = {"fid": 0.029568412345678, "kid": -1.25e-9, "reward": 3.0}
    lora.write_model_card(tmp_path, {"base_model": "x", "steps": 2}, metrics)
    assert lora.read_model_card(tmp_path)["validation"] == metrics
