"""configs/released: each config's first optimizer steps equal the authors' released script.

For each of deng-ai-lab/SDO's scripts (style_guide_implict.py, clip_guide_implict.py,
aesthetic_implict.py) the config runs as ``sdo fit`` on tiny models (tests/tiny_models.py), and a
loop written here with the script's settings (a diffusers scheduler built as the script builds it,
the networks called directly, the script's loss in the script's [-1, 1] convention, torch's Adam
with betas (0.9, 0.9)) runs the same 3 steps; the gradients and the latents must agree. The random
draws of the augmentations (DiffAugment copies, cutouts) are taken from the objective's record of
them; the loop applies them with its own code. Also here: inverting real images lands where
sampling resumes (the aesthetic script's bug), the SD 1.x start timestep the paper configs state,
and the text-editing paper config's fidelity weight against the released code's.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from sdo_lightning.testing.tiny_models import build_tiny_clip, build_tiny_ddpm, build_tiny_sd
from sdo_lightning.testing.tiny_objective_models import save

ROOT = Path(__file__).resolve().parents[1]
RELEASED = ROOT / "configs" / "released"
STEPS = 3
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("released_models")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "style.png")
    np.savez(root / "faces.npz", images=rng.random((1, 3, 8, 8), dtype=np.float32))  # tiny DDPM: 8 px
    np.savez(root / "photos.npz", images=rng.random((1, 3, 16, 16), dtype=np.float32))  # tiny SD: 16 px
    heads = []
    for i, dim in enumerate((8, 8)):  # linear heads scoring mostly inside [1, 10]
        g = torch.Generator().manual_seed(10 + i)
        heads.append(str(save({"weight": torch.randn(1, dim, generator=g) * 3, "bias": torch.tensor([5.0])},
                              root / f"head{i}.pth")))
    return {
        "sd": build_tiny_sd(root / "sd"),
        "ddpm": build_tiny_ddpm(root / "ddpm"),
        "clip_style": build_tiny_clip(root / "clip_style", vision_layers=4),
        "clip_text": build_tiny_clip(root / "clip_text", seed=1),
        # 8 px towers below the 16 px images, so the cutouts vary in size
        "clip_a": build_tiny_clip(root / "clip_a", seed=2, image_size=8, patch_size=4),
        "clip_b": build_tiny_clip(root / "clip_b", seed=3, image_size=8, patch_size=4),
        "heads": heads,
        "style": root / "style.png",
        "faces": root / "faces.npz",
        "photos": root / "photos.npz",
    }


def _tiny_config(name: str, tiny: dict, out: Path, edit=None) -> Path:
    config = yaml.safe_load((RELEASED / name).read_text())
    model = config["model"]["init_args"]
    backbone = model["backbone"]["init_args"]
    objective = model["objective"]
    if name == "style.yaml":
        backbone["model"] = str(tiny["sd"])
        objective["init_args"].update(model=str(tiny["clip_style"]), reference=str(tiny["style"]))
    elif name == "text_editing.yaml":
        backbone["model"] = str(tiny["ddpm"])
        objective["init_args"]["objectives"][0]["init_args"]["model"] = str(tiny["clip_text"])
        objective["init_args"]["warmup_steps"] = 2  # 3 steps see both phases
        config["data"]["init_args"]["images"] = str(tiny["faces"])
    else:
        backbone["model"] = str(tiny["sd"])
        objective["init_args"].update(models=[str(tiny["clip_a"]), str(tiny["clip_b"])], mlps=tiny["heads"])
        config["data"]["init_args"]["images"] = str(tiny["photos"])
    if edit is not None:
        edit(config)
    config["trainer"].update(max_steps=STEPS, accelerator="cpu", devices=1, default_root_dir=str(out),
                             logger=False, enable_checkpointing=False, enable_progress_bar=False)
    file = out / name
    file.write_text(yaml.safe_dump(config))
    return file


class Recorder:
    """Each step's gradient of the variable, the augmentation draws, and the variable after the step."""

    def __init__(self, draws) -> None:
        from lightning.pytorch import Callback

        outer = self

        class _Callback(Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                outer.grads.append(pl_module.variable.grad.detach().clone())
                outer.draws.append(copy.deepcopy(draws(pl_module.objective)))

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                outer.variables.append(pl_module.variable.detach().clone())

        self.callback = _Callback()
        self.grads: list[torch.Tensor] = []
        self.draws: list = []
        self.variables: list[torch.Tensor] = []


def _fit(file: Path, draws=lambda objective: None):
    from sdo_lightning.cli import main

    cli = main(["--config", str(file)], run=False)
    recorder = Recorder(draws)
    cli.trainer.callbacks.append(recorder.callback)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == STEPS and len(recorder.grads) == STEPS
    return cli.model, recorder


def _assert_steps_equal(recorder: Recorder, grads: list, latents: list) -> None:
    for step, (g_fit, g_ref, v_fit, v_ref) in enumerate(zip(recorder.grads, grads, recorder.variables, latents)):
        assert g_ref.abs().sum() > 0, f"step {step}: the reference gradient is 0"
        torch.testing.assert_close(g_fit, g_ref, rtol=1e-4, atol=1e-5 * float(g_ref.abs().max()),
                                   msg=lambda m: f"gradient of step {step}: {m}")
        torch.testing.assert_close(v_fit, v_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"latent after step {step}: {m}")


def _start_noise(module) -> torch.Tensor:
    from sdo_lightning import progress

    return progress.normal(module.backbone.latent_shape, [progress.latent_noise_seed(module.seed, 0)])


def _normalize_signed(x: torch.Tensor) -> torch.Tensor:
    """The scripts' CLIP normalization of images in [-1, 1]: mean 2 m - 1, std 2 s."""
    mean = torch.tensor([2 * m - 1 for m in CLIP_MEAN]).view(1, 3, 1, 1)
    std = torch.tensor([2 * s for s in CLIP_STD]).view(1, 3, 1, 1)
    return (x - mean) / std


def _sd_parts(path: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    vae = AutoencoderKL.from_pretrained(path / "vae").eval()
    text = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")

    @torch.no_grad()
    def embed(prompt: str) -> torch.Tensor:
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return text(ids).last_hidden_state

    return unet, vae, embed


def _released_ddim():
    """The Stable Diffusion scripts' scheduler: built with these arguments only (steps_offset 0)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(50)
    return scheduler


# -- style_guide_implict.py ------------------------------------------------------------------

def test_style_config_equals_the_released_loop(tiny, tmp_path):
    from PIL import Image
    from transformers import CLIPVisionModel

    module, recorder = _fit(_tiny_config("style.yaml", tiny, tmp_path))

    unet, vae, embed = _sd_parts(tiny["sd"])
    texts = torch.cat([embed(""), embed("A portrait of Caleb, a character from the Critical Role series.")])
    scheduler = _released_ddim()
    pre_steps, guidance = 45, 5.0

    def guided(x, t):
        uncond, cond = unet(torch.cat([x, x]), t, encoder_hidden_states=texts).sample.chunk(2)
        return uncond + guidance * (cond - uncond)

    vision = CLIPVisionModel.from_pretrained(tiny["clip_style"]).eval()
    size = vision.config.image_size

    def third_block(img):  # [-1, 1] images -> the patch tokens after the third transformer block
        img = _normalize_signed(F.interpolate(img, size=(size, size), mode="bicubic", align_corners=False))
        inner = getattr(vision, "vision_model", vision)  # transformers 5 flattened it
        h = inner.pre_layrnorm(inner.embeddings(img))
        for layer in inner.encoder.layers[:3]:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        return h[0, 1:]

    ref = torch.from_numpy(np.asarray(Image.open(tiny["style"]).convert("RGB"), dtype=np.float64) / 255 * 2 - 1)
    ref = ref.permute(2, 0, 1)[None].float()

    def loss_fn(out):
        f_img, f_ref = third_block(out), third_block(ref)
        return ((f_img.t() @ f_img - f_ref.t() @ f_ref) ** 2).mean()

    with torch.no_grad():  # the script samples 45 steps from noise without gradient
        x = _start_noise(module)
        for t in scheduler.timesteps[:pre_steps]:
            x = scheduler.step(guided(x, t), t, x, use_clipped_model_output=True, eta=0.0).prev_sample
    torch.testing.assert_close(module.start_latent.cpu(), x, rtol=1e-5, atol=1e-6)
    z = x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=0.01, betas=(0.9, 0.9))
    grads, latents = [], []
    for _ in range(STEPS):
        optimizer.zero_grad()
        for i, t in enumerate(scheduler.timesteps[pre_steps:]):
            if i == 0:
                eps = guided(z, t)
            else:
                with torch.no_grad():
                    eps = guided(x_t, t)
            x_t = scheduler.step(eps, t, z if i == 0 else x_t, use_clipped_model_output=True, eta=0.0).prev_sample
        out = torch.clamp(vae.decode(x_t / 0.18215).sample, -1, 1)
        loss_fn(out).backward()
        grads.append(z.grad.clone())
        optimizer.step()
        latents.append(z.detach().clone())
    _assert_steps_equal(recorder, grads, latents)


# -- clip_guide_implict.py -------------------------------------------------------------------

def _diffaugment(x: torch.Tensor, draws: dict) -> torch.Tensor:
    """DiffAugment of copies in [-1, 1] with given draws, written out copy by copy."""
    out = []
    n, _, h, w = x.shape
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    for k in range(n):
        y = x[k]
        b, s, c = (float(v) for v in draws["color"][:, k])
        y = y + (b - 0.5)
        y = (y - y.mean(0, keepdim=True)) * (2 * s) + y.mean(0, keepdim=True)
        y = (y - y.mean()) * (c + 0.5) + y.mean()
        dy, dx = (int(v) for v in draws["translation"][k])
        moved = torch.zeros_like(y)
        moved[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            y[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
        out.append(moved)
    y = torch.stack(out)
    new = int(draws["resize"] * w)
    y = F.interpolate(y, size=new, mode="bilinear", align_corners=False)
    if new < w:
        pad = (w - new) // 2
        y = F.pad(y, (pad, w - new - pad, pad, w - new - pad))
    else:
        y = y[..., :h, :w]
    mask = torch.ones_like(y)
    for k in range(n):
        cy, cx = (int(v) for v in draws["cutout"][k])
        top, left = max(cy - ch // 2, 0), max(cx - cw // 2, 0)
        mask[k, :, top:cy - ch // 2 + ch, left:cx - cw // 2 + cw] = 0
    return y * mask


def test_text_editing_config_equals_the_released_loop(tiny, tmp_path):
    from diffusers import DDIMScheduler, UNet2DModel
    from transformers import CLIPModel, CLIPTokenizer

    with pytest.warns(UserWarning, match="clip_sample=True clamps"):  # the explicit opt-in warns
        module, recorder = _fit(_tiny_config("text_editing.yaml", tiny, tmp_path),
                                lambda objective: objective.objectives[0].augment.last)

    unet = UNet2DModel.from_pretrained(tiny["ddpm"] / "unet").eval()
    scheduler = DDIMScheduler()  # the script's: diffusers' defaults, clip_sample on
    scheduler.set_timesteps(50)
    clip = CLIPModel.from_pretrained(tiny["clip_text"]).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny["clip_text"])
    with torch.no_grad():
        text = clip.get_text_features(**tokenizer(["A photo of a smile face."], return_tensors="pt"))
        text = getattr(text, "pooler_output", text)
    ref = torch.from_numpy(np.load(tiny["faces"])["images"]) * 2 - 1
    size = clip.config.vision_config.image_size

    def loss_fn(x, draws, alpha):
        sim = (x - ref).abs().mean()
        aug = _diffaugment(x.repeat(20, 1, 1, 1), draws)
        aug = _normalize_signed(F.interpolate(aug, size=size, mode="bilinear", align_corners=False))
        image = clip.get_image_features(pixel_values=aug)
        image = getattr(image, "pooler_output", image)
        cosine = F.cosine_similarity(image, text, dim=-1)
        return alpha * (-cosine).mean() + (1 - alpha) * sim

    z = _start_noise(module).requires_grad_(True)
    torch.testing.assert_close(module.start_latent.cpu(), z.detach())
    optimizer = torch.optim.Adam([z], lr=0.01, betas=(0.9, 0.9))
    grads, latents = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        for i, t in enumerate(scheduler.timesteps):
            if i == 0:
                eps = unet(z, t).sample
            else:
                with torch.no_grad():
                    eps = unet(x_t, t).sample
            x_t = scheduler.step(eps[:, :3], t, z if i == 0 else x_t, use_clipped_model_output=True).prev_sample
        out = torch.clamp(x_t, -1, 1)
        alpha = 0.0 if step < 2 else 0.5  # warm-up of 2 steps in this test (150 in the config)
        loss_fn(out, recorder.draws[step], alpha).backward()
        grads.append(z.grad.clone())
        optimizer.step()
        latents.append(z.detach().clone())
    _assert_steps_equal(recorder, grads, latents)


# -- aesthetic_implict.py --------------------------------------------------------------------

def test_aesthetic_config_equals_the_released_loop_resumed_where_the_inversion_lands(tiny, tmp_path):
    from diffusers import DDIMInverseScheduler
    from transformers import CLIPModel

    module, recorder = _fit(_tiny_config("aesthetic.yaml", tiny, tmp_path),
                            lambda objective: objective.cutouts.last)

    unet, vae, embed = _sd_parts(tiny["sd"])
    empty = embed("")
    inverse = DDIMInverseScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    inverse.set_timesteps(50)
    scheduler = _released_ddim()
    pre_steps = 10
    photo = torch.from_numpy(np.load(tiny["photos"])["images"]) * 2 - 1
    with torch.no_grad():
        # the script samples the VAE posterior; the project encodes its mean
        x = vae.encode(photo).latent_dist.mean * 0.18215
        for t in inverse.timesteps[:pre_steps]:
            x = inverse.step(unet(x, t, encoder_hidden_states=empty).sample, t, x).prev_sample
    torch.testing.assert_close(module.start_latent.cpu(), x, rtol=1e-4, atol=1e-5)
    assert int(inverse.timesteps[pre_steps - 1]) == 180
    resumed = scheduler.timesteps[scheduler.timesteps <= 180]  # the fix; the script took timesteps[10:] (780 ...)
    assert len(resumed) == pre_steps

    models = [CLIPModel.from_pretrained(tiny[k]).eval() for k in ("clip_a", "clip_b")]
    heads = []
    for file in tiny["heads"]:
        head = torch.nn.Linear(8, 1)
        head.load_state_dict(torch.load(file))
        heads.append(head)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def loss_fn(out, boxes):
        pixels = ((out / 2) + 0.5).clamp(0, 1)
        crops = torch.cat([F.adaptive_avg_pool2d(pixels[:, :, top:top + side, left:left + side], 8)
                           for side, top, left in boxes])
        crops = (crops - mean) / std
        scores = []
        for model, head in zip(models, heads):
            features = model.get_image_features(pixel_values=crops)
            features = getattr(features, "pooler_output", features)
            features = features / features.norm(dim=-1, keepdim=True)
            scores.append(head(features).clip(1, 10).mean())
        prediction = (0.5 * scores[0] + 1.5 * scores[1]) / 2
        return abs(prediction - 10.0)

    # from the module's start (the float64 inversion there differs from this float32 one by rounding)
    z = module.start_latent.detach().cpu().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=0.01, betas=(0.9, 0.9))
    grads, latents = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        for i, t in enumerate(resumed):
            if i == 0:
                eps = unet(z, t, encoder_hidden_states=empty).sample
            else:
                with torch.no_grad():
                    eps = unet(x_t, t, encoder_hidden_states=empty).sample
            x_t = scheduler.step(eps, t, z if i == 0 else x_t, use_clipped_model_output=True, eta=0.0).prev_sample
        out = torch.clamp(vae.decode(x_t / 0.18215).sample, -1, 1)
        boxes = recorder.draws[step]
        assert len(boxes) == 16 and len({side for side, _, _ in boxes}) > 1  # 16 cutouts of varying size
        loss_fn(out, boxes).backward()
        grads.append(z.grad.clone())
        optimizer.step()
        latents.append(z.detach().clone())
    _assert_steps_equal(recorder, grads, latents)


# -- where sampling resumes after an inversion ---------------------------------------------------

SD_SCHEDULE = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
               "set_alpha_to_one": False, "steps_offset": 1}


def test_invert_images_lands_on_the_timestep_sampling_resumes_from():
    """With a constant epsilon, DDIM inversion and DDIM sampling are exact inverses: inverting to
    ``start_timestep`` and sampling from there returns the image (closed form: the inverted latent
    is ``sqrt(a_t) x0_hat + sqrt(1 - a_t) eps``), while resuming 30 steps higher, as the released
    aesthetic script does (inverted to t = 180, resumed at timesteps[10:] = 780), does not."""
    from diffusers import DDIMScheduler

    from sdo_lightning import sample
    from sdo_lightning.sampling.inversion import invert
    from sdo_lightning.solvers import DDIM

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(1, 4, 8, 8, generator=g,
                                                                                     dtype=torch.float64)
    denoiser = lambda x, t, cond: eps  # noqa: E731
    solver = DDIM(50, start_timestep=180, scheduler_kwargs={"steps_offset": 0})
    assert int(solver.begin(SD_SCHEDULE).timesteps[0]) == 180
    xt = invert(denoiser, x0, None, solver, SD_SCHEDULE)
    alphas = DDIMScheduler.from_config({**SD_SCHEDULE, "steps_offset": 0}).alphas_cumprod.double()
    x0_hat = (x0 - (1 - alphas[0]).sqrt() * eps) / alphas[0].sqrt()  # x0 lies at the final alpha, a[0]
    torch.testing.assert_close(xt, alphas[180].sqrt() * x0_hat + (1 - alphas[180]).sqrt() * eps)
    torch.testing.assert_close(sample(denoiser, solver, xt, scheduler_config=SD_SCHEDULE), x0)
    released = DDIM(50, start_timestep=780, scheduler_kwargs={"steps_offset": 0})
    assert not torch.allclose(sample(denoiser, released, xt, scheduler_config=SD_SCHEDULE), x0, atol=1e-2)


def test_sd_pipelines_steps_offset_starts_start_timestep_600_at_581():
    """SD 1.x pipelines ship steps_offset 1: with 50 steps the timesteps are 981, 961, ..., so
    ``start_timestep: 600`` starts at 581 (30 calls); with the released scripts' steps_offset 0 it is 600.
    The paper configs say so in their comments."""
    from sdo_lightning.solvers import DDIM

    timesteps = DDIM(50, start_timestep=600).begin(SD_SCHEDULE).timesteps
    assert int(timesteps[0]) == 581 and len(timesteps) == 30
    released = DDIM(50, start_timestep=600, scheduler_kwargs={"steps_offset": 0}).begin(SD_SCHEDULE).timesteps
    assert int(released[0]) == 600
    for name in ("style_guided", "aesthetic", "aesthetic_real_images"):
        text = (ROOT / "configs" / "paper" / f"{name}.yaml").read_text()
        assert "t = 581" in text, f"configs/paper/{name}.yaml does not state where it starts"


# -- the text-editing fidelity weight ---------------------------------------------------------

@pytest.mark.parametrize("name", ["text_editing", "text_editing_dpm"])
def test_paper_text_editing_fidelity_weight_matches_the_released_gradient_ratio(tiny, name):
    """At the paper's 256 px, the ratio of the fidelity term's gradient to the CLIP term's (w.r.t.
    the image) in the paper's text-editing configs equals the released script's, whose loss is
    ``0.5 * (-cos) + 0.5 * mean |x - x_ref|`` on [-1, 1] (the CLIP term scored alike in both)."""
    from sdo_lightning.objectives import CLIPScore, L2Fidelity

    config = yaml.safe_load((ROOT / "configs" / "paper" / f"{name}.yaml").read_text())
    objective = config["model"]["init_args"]["objective"]["init_args"]
    (w_clip, w_fid), (clip_node, fid_node) = objective["weights"], objective["objectives"]
    assert clip_node["class_path"] == "CLIPScore" and fid_node["class_path"] == "L2Fidelity"
    clip = CLIPScore(str(tiny["clip_text"]), prompt="a photo of an angry face")
    fidelity = L2Fidelity(**fid_node["init_args"])
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 256, 256, generator=g, requires_grad=True)
    batch = {"image": torch.rand(1, 3, 256, 256, generator=g)}

    def grad_norm(loss):
        (grad,) = torch.autograd.grad(loss.sum(), image)
        return grad.norm()

    config_ratio = grad_norm(w_fid * fidelity(image, batch)) / grad_norm(w_clip * clip(image, batch))
    signed, ref = image * 2 - 1, batch["image"] * 2 - 1
    released_ratio = grad_norm(0.5 * (signed - ref).abs().mean()) / grad_norm(0.5 * clip(image, batch))
    assert math.isclose(config_ratio, released_ratio, rel_tol=0.01), (float(config_ratio), float(released_ratio))


# -- the configs themselves ---------------------------------------------------------------------

def test_there_is_a_released_config_per_script_each_saying_how_to_run_it():
    names = sorted(p.name for p in RELEASED.glob("*.yaml"))
    assert names == ["aesthetic.yaml", "style.yaml", "text_editing.yaml"]
    for name in names:
        text = (RELEASED / name).read_text()
        assert text.startswith(f"# Run: sdo fit --config configs/released/{name}\n")
        assert re.search(r"betas: \[0\.9, 0\.9\]", text) and "steps_offset: 0" in text and "32-true" in text


def test_fp16_latent_under_grad_scaler_raises_and_fp32_does_not():
    """The Stable Diffusion scripts' second bug, on the CPU scaler: an fp16 latent stepped through
    GradScaler raises at the first step; the released configs' fp32 latent steps."""
    for dtype in (torch.float16, torch.float32):
        z = torch.randn(1, 4, 8, 8, dtype=dtype, requires_grad=True)
        optimizer = torch.optim.Adam([z], lr=0.01, betas=(0.9, 0.9))
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale((z.float() ** 2).sum()).backward()
        if dtype == torch.float16:
            with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
                scaler.step(optimizer)
        else:
            before = z.detach().clone()
            scaler.step(optimizer)
            assert not torch.equal(z.detach(), before)


# -- the features the released configs use, each against a closed form ----------------------------

def test_l1_fidelity_is_the_mean_absolute_difference_on_the_chosen_range():
    from sdo_lightning.objectives import L1Fidelity

    g = torch.Generator().manual_seed(0)
    x, ref = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    expected = (x - ref).abs().flatten(1).mean(1)
    torch.testing.assert_close(L1Fidelity("image")(x, {"image": ref}), 2 * expected)
    torch.testing.assert_close(L1Fidelity("image", signed=False)(x, {"image": ref}), expected)


def test_weighted_sum_uses_the_warmup_weights_below_warmup_steps():
    from sdo_lightning.objectives import L1Fidelity, L2Fidelity, WeightedSum

    g = torch.Generator().manual_seed(0)
    x, ref = torch.rand(1, 3, 4, 4, generator=g), torch.rand(1, 3, 4, 4, generator=g)
    l1, l2 = 2 * (x - ref).abs().mean(), (x - ref).pow(2).mean()
    total = WeightedSum([L1Fidelity("image"), L2Fidelity(reference="image")], [0.5, 0.5], warmup_steps=2,
                        warmup_weights=[0.0, 1.0])
    for step, expected in ((0, l2), (1, l2), (2, 0.5 * l1 + 0.5 * l2), (7, 0.5 * l1 + 0.5 * l2)):
        torch.testing.assert_close(total(x, {"image": ref, "step": step}), expected.reshape(1))
    with pytest.raises(KeyError, match="batch\\['step'\\]"):
        total(x, {"image": ref})
    with pytest.raises(ValueError, match="give both"):
        WeightedSum([L1Fidelity()], [1.0], warmup_steps=3)


def test_diffaugment_with_no_shift_and_unit_factors_is_the_identity():
    """Brightness 0.5, saturation 0.5 and contrast 0.5 draws leave the image as it is; so does a zero shift."""
    from sdo_lightning.objectives.augment import DiffAugment

    augment = DiffAugment(copies=3, policy="color,translation")
    augment.draw = lambda n, h, w, device: {"color": torch.full((3, n), 0.5), "translation": torch.zeros(n, 2, dtype=torch.long)}
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(augment(x), x.repeat_interleave(3, dim=0))


def test_hard_decode_clamp_gives_saturated_pixels_no_gradient(tiny):
    from sdo_lightning.backbones import PixelUNetBackbone

    backbone = PixelUNetBackbone(str(tiny["ddpm"]), local_files_only=True)
    latents = torch.tensor([-1.5, -0.5, 0.5, 1.5]).view(1, 1, 2, 2).repeat(1, 3, 1, 1).requires_grad_(True)
    for clamp, expected in (("straight_through", [0.5, 0.5, 0.5, 0.5]), ("hard", [0.0, 0.5, 0.5, 0.0])):
        backbone.decode_clamp = clamp
        images = backbone.decode(latents)
        torch.testing.assert_close(images[0, 0].flatten(), torch.tensor([0.0, 0.25, 0.75, 1.0]))
        (grad,) = torch.autograd.grad(images.sum(), latents)
        torch.testing.assert_close(grad[0, 0].flatten(), torch.tensor(expected))
