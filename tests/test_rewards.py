"""The rewards users optimize today: HPSv2.1, PickScore, the chi prior on the noise norm, and a
held-out ("gold") objective for LatentOptimization.

Reference values come from other code paths: the tiny models' own encoders (open_clip's
``encode_image``/``encode_text``, CLIPModel's ``get_image_features``/``get_text_features``),
CLIPImageProcessor on a real photo, ``scipy.stats.chi.logpdf``, the chi log-density's analytic
gradient, finite differences, and objectives evaluated by hand on the images a fit wrote to disk.
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from objective_fixtures import assert_one_sentence, check_gradient, check_per_sample, rand
from sdo_lightning import Objective
from sdo_lightning.objectives import CLIPScore, HPSv2Score, L2Fidelity, NoiseNormPrior, PickScore, WeightedSum
from sdo_lightning.objectives.clip import CLIP_MEAN, CLIP_STD
from test_clip_preprocessing import assert_close_to_processor, differences, processed
from sdo_lightning.testing.tiny_models import build_tiny_clip
from sdo_lightning.testing.tiny_objective_models import TinyOpenCLIP, install_fake_open_clip, save, tiny_tokenize

LOGIT_SCALE = 3.3  # exp: 27.1, neither CLIP's init (14.3) nor PickScore's (about 100)


# -- HPSv2.1 --------------------------------------------------------------------------------------

def _hps_expected(model, x, prompts):
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in ((0.4, 0.45, 0.5), (0.25, 0.3, 0.2)))
    image = model.encode_image((x - mean) / std)
    text = model.encode_text(tiny_tokenize(prompts))
    return (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))


@pytest.mark.parametrize("layout", ["state_dict", "module_prefix", "bare"])
def test_hps_v2_1_checkpoint_loads_in_every_layout(monkeypatch, tmp_path, layout):
    """HPSv2's scorer loads both files as ``torch.load(f)["state_dict"]`` into open_clip's ViT-H-14;
    a DDP-prefixed (``module.``) or unwrapped state dict loads the same weights."""
    install_fake_open_clip(monkeypatch)
    model = TinyOpenCLIP(seed=43)  # differs from what the fake create_model builds
    state = model.state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}} if layout == "module_prefix" else (
        {"state_dict": state, "epoch": 1} if layout == "state_dict" else state)
    path = save(wrapped, tmp_path / "HPS_v2.1_compressed.pt")
    objective = HPSv2Score(str(path)).double()
    x, prompts = rand(2, 3, 16, 16, seed=44), ["a cat", "a dog"]
    with torch.no_grad():
        torch.testing.assert_close(objective(x, {"prompt": prompts}), -_hps_expected(model.double(), x, prompts),
                                   rtol=1e-10, atol=1e-12)


def test_hps_errors_name_both_checkpoints(monkeypatch, tmp_path):
    install_fake_open_clip(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed.pt or HPS_v2.1_compressed.pt") as e:
        HPSv2Score(str(tmp_path / "HPS_v2.1_compressed.pt"))
    assert_one_sentence(e)
    assert "HPS_v2.1_compressed.pt" in HPSv2Score.__doc__


# -- PickScore ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pick_dir(tmp_path_factory):
    """The tiny CLIP (input 32, no processor config) with its logit scale set to LOGIT_SCALE."""
    from transformers import CLIPModel

    root = build_tiny_clip(tmp_path_factory.mktemp("pickscore"))
    model = CLIPModel.from_pretrained(root)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    model.save_pretrained(root)
    return root


def _features(output):
    # transformers 5 returns a model output whose pooler_output is the projected embedding
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_pickscore_is_the_models_logit_scale_times_cosine(pick_dir):
    from transformers import CLIPModel, CLIPTokenizer

    objective = PickScore(str(pick_dir)).double()
    x = rand(3, 3, 32, 32, seed=40)  # the tower's input size: preprocessing is normalization only
    prompts = ["a red cat", "a blue dog", "a red cat"]
    clip = CLIPModel.from_pretrained(pick_dir).double().eval()
    tokens = CLIPTokenizer.from_pretrained(pick_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
        image = _features(clip.get_image_features(pixel_values=(x - mean) / std))
        text = _features(clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))
        cosine = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
        expected = clip.logit_scale.exp() * cosine  # the saved scale: float32(3.3)
        loss = objective(x, {"prompt": prompts})
    assert clip.logit_scale.item() == pytest.approx(LOGIT_SCALE, abs=1e-6)
    torch.testing.assert_close(loss, -expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(objective.terms["pickscore"], expected, rtol=1e-10, atol=1e-10)
    fixed = PickScore(str(pick_dir), prompt="a blue dog").double()
    with torch.no_grad():
        torch.testing.assert_close(fixed(x[1:2], {}), -expected[1:2], rtol=1e-10, atol=1e-10)


def test_pickscore_preprocesses_with_clipscores_transform_like_the_processor(tmp_path):
    """The same code path as CLIPScore (checked in test_clip_preprocessing.py), and on the real photo
    the same pixels as CLIPImageProcessor with a processor config in the legacy int form the
    ViT-H-14 processor the PickScore authors load uses (short side 224, bicubic, crop 224)."""
    from sklearn.datasets import load_sample_image
    from transformers import CLIPImageProcessor

    assert PickScore.preprocess is CLIPScore.preprocess and PickScore.image_embeds is CLIPScore.image_embeds
    build_tiny_clip(tmp_path, vision_layers=1, text_layers=1, image_size=224, patch_size=32)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "size": 224}))
    photo = load_sample_image("china.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = processed(CLIPImageProcessor.from_pretrained(tmp_path), photo)
    objective = PickScore(str(tmp_path)).double()
    ours = objective.preprocess(torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].double() / 255)
    assert_close_to_processor(ours, reference)
    mean, p99, top = differences(ours, reference)
    assert mean < 0.006 and top < 0.1, (mean, p99, top)  # measured 0.0041 / 0.059, as CLIPScore's


@pytest.mark.parametrize("shape", [(2, 3, 48, 40), (2, 1, 24, 24)])  # resized and cropped; grayscale
def test_pickscore_gradient_and_per_sample(pick_dir, shape):
    objective = PickScore(str(pick_dir), prompt="a red cat").double()
    check_gradient(lambda y: objective(y, {}), rand(*shape, seed=41))
    check_per_sample(lambda y: objective(y, {}), rand(3, *shape[1:], seed=42))


def test_pickscore_errors_are_one_sentence(tmp_path, pick_dir):
    for model in (str(tmp_path / "nowhere"), "yuvalkirstain/PickScore_v1"):
        with pytest.raises(FileNotFoundError, match=r"`hf download yuvalkirstain/PickScore_v1`") as e:
            PickScore(model, local_files_only=True)
        assert_one_sentence(e)
    with pytest.raises(KeyError, match="PickScore has no text"):
        PickScore(str(pick_dir))(torch.rand(1, 3, 32, 32), {})


# -- NoiseNormPrior -------------------------------------------------------------------------------

def _latent_with_norm(norm, shape, seed=0, dtype=torch.float64):
    z = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (z * (norm / z.flatten(1).norm(dim=1)).view(-1, *[1] * (len(shape) - 1))).to(dtype)


SHAPES = {1: (1,), 2: (2,), 16: (1, 4, 4), 1024: (4, 16, 16), 65536: (4, 128, 128)}


@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_noise_prior_is_the_chi_negative_log_density_from_its_mode(dims):
    """loss(r) = -chi.logpdf(r, D) + chi.logpdf(sqrt(D - 1), D), at norms from far below to far above
    the mode (quantiles 1e-4 .. 1 - 1e-4, and 0.5 and 1.5 times the mode)."""
    from scipy.stats import chi

    mode = math.sqrt(dims - 1)
    norms = [float(chi.ppf(q, dims)) for q in (1e-4, 0.1, 0.5, 0.9, 1 - 1e-4)]
    norms += [0.5 * mode, 1.5 * mode] if dims > 1 else [2.0]
    z = torch.cat([_latent_with_norm(r, (1, *SHAPES[dims]), seed=i) for i, r in enumerate(norms)])
    expected = torch.tensor([chi.logpdf(mode, dims) - chi.logpdf(r, dims) for r in norms], dtype=torch.float64)
    prior = NoiseNormPrior()
    images = torch.rand(len(z), 1, 4, 4)  # ignored
    loss = prior(images, {"latent": z})
    assert loss.dtype == torch.float64 and (loss >= 0).all()
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(prior.terms["noise_norm"], torch.tensor(norms, dtype=torch.float64) / math.sqrt(dims))
    loss32 = prior(images, {"latent": z.float()})  # float32: at most 3e-5 off inside the peak at D = 65536
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_noise_prior_is_finite_for_half_precision_latents_of_65536_elements(dtype):
    """A 4 x 128 x 128 latent in half precision (its sum of squares, about 65536, overflows fp16):
    the loss is computed in float32 and equals the float64 value of the same rounded latent."""
    z = torch.randn(3, 4, 128, 128, generator=torch.Generator().manual_seed(5)).to(dtype)
    if dtype is torch.float16:
        assert torch.isinf(z.pow(2).sum())  # what computing it in the latent's precision would give
    prior = NoiseNormPrior()
    loss = prior(torch.rand(3, 3, 8, 8).to(dtype), {"latent": z})
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    reference = prior(torch.rand(3, 3, 8, 8), {"latent": z.double()})
    torch.testing.assert_close(loss.double(), reference, rtol=1e-4, atol=1e-4)


def test_noise_prior_gradient_matches_finite_difference_and_formula():
    """d loss / d z = z (1 - (D - 1) / r^2), the gradient of r^2 / 2 - (D - 1) log r."""
    prior = NoiseNormPrior()
    images = torch.rand(2, 1, 4, 4)
    z = torch.cat([_latent_with_norm(r, (1, 4, 8, 8), seed=i) for i, r in enumerate((6.0, 11.0))])  # D = 256
    check_gradient(lambda y: prior(images, {"latent": y}), z)
    z = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(prior(images, {"latent": z}).sum(), z)
    r2 = z.detach().flatten(1).pow(2).sum(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(grad, z.detach() * (1 - 255 / r2), rtol=1e-12, atol=1e-12)
    check_per_sample(lambda y: prior(images, {"latent": y}), z.detach())


@pytest.mark.parametrize("start", [0.5, 1.6])  # times the mode: far inside and far outside the shell
def test_noise_prior_pulls_the_norm_to_the_mode_in_a_few_adam_steps(start):
    """Ten Adam steps (lr 0.05, D = 1024, mode 32) move ||z|| toward the mode at every step and
    close over half the gap (measured: 83% from 16 below, 59% from 19 above)."""
    dims = 1024
    mode = math.sqrt(dims - 1)
    z = _latent_with_norm(start * mode, (1, 4, 16, 16), dtype=torch.float32).requires_grad_()
    optimizer = torch.optim.Adam([z], lr=0.05)
    prior, images = NoiseNormPrior(), torch.rand(1, 1, 4, 4)
    distances = [abs(start - 1) * mode]
    for _ in range(10):
        optimizer.zero_grad()
        prior(images, {"latent": z}).sum().backward()
        optimizer.step()
        distances.append(abs(z.detach().norm().item() - mode))
    assert all(b < a for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] < 0.5 * distances[0], distances


def test_noise_prior_beside_a_reward_in_a_weighted_sum():
    images = rand(2, 1, 8, 8, seed=45).requires_grad_()
    z = _latent_with_norm(12.0, (2, 1, 8, 8)).requires_grad_()
    initial = rand(2, 1, 8, 8, seed=46)
    total = WeightedSum([L2Fidelity(), NoiseNormPrior()], [1.0, 0.5])
    loss = total(images, {"latent": z, "initial_images": initial})
    expected = L2Fidelity()(images, {"initial_images": initial}) + 0.5 * NoiseNormPrior()(images, {"latent": z})
    torch.testing.assert_close(loss, expected)
    image_grad, latent_grad = torch.autograd.grad(loss.sum(), (images, z))
    assert image_grad.abs().sum() > 0 and latent_grad.abs().sum() > 0
    assert set(total.terms) == {"L2Fidelity", "l2", "NoiseNormPrior", "noise_norm"}


def test_noise_prior_without_a_latent_is_a_clear_error():
    with pytest.raises(KeyError, match=r"batch\['latent'\].*LatentOptimization") as e:
        NoiseNormPrior()(torch.rand(2, 3, 8, 8), {"prompt": "a cat"})
    assert_one_sentence(e)


# -- LatentOptimization: batch["latent"] ----------------------------------------------------------

class RecordingBrightness(Objective, register=False):
    """Mean brightness; records the latents it was given."""

    def __init__(self):
        super().__init__()
        self.latents = []

    def forward(self, images, batch):
        self.latents.append(batch["latent"])
        return images.flatten(1).mean(1)


def _fit(module, data, root, steps, logger=False, callbacks=None):
    from lightning.pytorch import Trainer

    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=logger, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                      default_root_dir=root, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    return trainer


def _module(tiny_digits_dir, objective, **kw):
    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.modules.latent_optimization import LatentOptimization
    from sdo_lightning.solvers import DDIM

    return LatentOptimization(objective=objective, backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(4), **kw)


@pytest.mark.parametrize("linf", [None, 0.2])
def test_objectives_see_the_differentiable_start_latent(tiny_digits_dir, tmp_path, linf):
    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.modules.targets import StartNoise

    from lightning.pytorch import Callback

    variables = []

    class RecordVariable(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            variables.append(pl_module.variable.detach().clone())

    objective = RecordingBrightness()
    module = _module(tiny_digits_dir, objective, target=StartNoise(project_to_shell=False, linf_radius=linf), lr=0.1)
    _fit(module, SampleSet(num_samples=2), tmp_path, steps=2, callbacks=[RecordVariable()])
    training, (before, after) = objective.latents[:2], objective.latents[2:]
    for seen, variable in zip(training, variables):
        assert seen.requires_grad
        expected = variable if linf is None else module.start_latent + variable
        torch.testing.assert_close(seen.detach(), expected, rtol=0, atol=0)
    # the summary: "before" the prepared start latent, "after" the one the variable makes now
    torch.testing.assert_close(before, module.start_latent, rtol=0, atol=0)
    now = module.variable.detach() if linf is None else module.start_latent + module.variable.detach()
    torch.testing.assert_close(after, now, rtol=0, atol=0)
    assert not torch.equal(before, after)


def test_noise_prior_under_reward_fine_tuning_is_a_clear_error(tiny_digits_dir, tmp_path):
    from sdo_lightning.backbones import DigitsBackbone
    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.modules.reward_finetuning import RewardFineTuning
    from sdo_lightning.solvers import DDIM

    module = RewardFineTuning(objective=NoiseNormPrior(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(2))
    with pytest.raises(KeyError, match="RewardFineTuning draws fresh noise"):
        _fit(module, SampleSet(num_samples=2), tmp_path, steps=1)


def test_noise_prior_lowers_the_chi_loss_of_optimized_noise(tiny_digits_dir, tmp_path):
    """Under LatentOptimization (x_T, no shell projection, D = 64) five steps cut the chi loss of
    the start noise, computed here with scipy from the latents' norms, by more than half (measured
    0.078 -> 0.018), and summary.json reports it before and after from the right latents."""
    from scipy.stats import chi

    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.modules.targets import StartNoise

    module = _module(tiny_digits_dir, NoiseNormPrior(), target=StartNoise(project_to_shell=False), lr=0.05)
    _fit(module, SampleSet(num_samples=4), tmp_path, steps=5)
    mode = math.sqrt(64 - 1)
    chi_loss = lambda z: np.mean([chi.logpdf(mode, 64) - chi.logpdf(r, 64) for r in z.flatten(1).norm(dim=1).tolist()])  # noqa: E731
    before, after = chi_loss(module.start_latent), chi_loss(module.variable.detach())
    assert after < 0.5 * before, (before, after)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["before"]["loss"] == pytest.approx(before, rel=1e-5)
    assert summary["after"]["loss"] == pytest.approx(after, rel=1e-5)


# -- LatentOptimization: the held-out objective ---------------------------------------------------

class NoisyBrightness(Objective, register=False):
    """Brightness of randomly reweighted pixels: draws from the global generator, and the draws
    change its gradient (a held-out objective that shifted them would change the optimization)."""

    def forward(self, images, batch):
        weights = 1 + torch.rand(images.shape, dtype=images.dtype)
        return (weights * images).flatten(1).mean(1)


def _digit_loss(images, target=3):
    """ClassifierObjective(target_class=3) by hand: -log softmax(classifier(images))[:, 3]."""
    from sdo_lightning.digits import WEIGHTS_DIR, DigitClassifier

    classifier = DigitClassifier.from_pretrained(WEIGHTS_DIR / "classifier").eval()
    with torch.no_grad():
        return -torch.log_softmax(classifier(images), dim=-1)[:, target]


def test_held_out_objective_is_logged_and_reported(tiny_digits_dir, tiny_weights, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdo_lightning.training.data import SampleSet
    from sdo_lightning.objectives import ClassifierObjective

    held_out = ClassifierObjective(target_class=3)
    module = _module(tiny_digits_dir, RecordingBrightness(), lr=0.3, held_out_objective=held_out)
    _fit(module, SampleSet(num_samples=3), tmp_path, steps=3, logger=TensorBoardLogger(tmp_path / "runs"))
    log_dir = tmp_path / "runs" / "lightning_logs" / "version_0"
    events = EventAccumulator(str(log_dir)).Reload()
    held = events.Scalars("train/held_out")
    assert [e.step for e in held] == [0, 1, 2] and all(math.isfinite(e.value) for e in held)
    summary = json.loads((log_dir / "summary.json").read_text())
    data = np.load(log_dir / "samples.npz")
    for label in ("before", "after"):
        expected = _digit_loss(torch.from_numpy(data[label])).mean().item()
        assert summary[label]["held_out"] == pytest.approx(expected, rel=1e-6, abs=1e-7), (label, summary)
    assert summary["before"]["held_out"] != summary["after"]["held_out"]
    held_keys = [k for k in module.state_dict() if k.startswith("held_out_objective.")]
    assert held_keys and not any(module.is_trainable_key(k) for k in held_keys)  # not in checkpoints


def test_held_out_objective_does_not_change_the_optimization(tiny_digits_dir, tmp_path):
    """Same seed, with and without a held-out objective that draws from the same global generator
    as the optimized one: the same variable and best images, bitwise."""
    from sdo_lightning.training.data import SampleSet

    runs = []
    for held_out in (None, NoisyBrightness()):
        module = _module(tiny_digits_dir, NoisyBrightness(), lr=0.3, held_out_objective=held_out)
        torch.manual_seed(0)
        _fit(module, SampleSet(num_samples=2), tmp_path, steps=3)
        runs.append((module.variable.detach().clone(), module.best_images.clone(), module.best_loss.clone()))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(runs[0][0], module.start_latent)  # it did optimize
