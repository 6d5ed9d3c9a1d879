"""RewardFineTuning with LoRA on a tiny random digits model."""

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file
from torch import nn

from sdo_lightning import Objective, lora
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.training.data import SampleSet
from sdo_lightning.gradient_modes import FullBackprop, ShortcutGradient, TruncatedBackprop
from sdo_lightning.modules.reward_finetuning import RewardFineTuning
from sdo_lightning.solvers import DDIM


class Darkness(Objective, register=False):
    def forward(self, images, batch):
        return images.flatten(1).mean(1)


def fit(module, tmp_path, steps=2, **trainer_kw):
    trainer = Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, **trainer_kw)
    trainer.fit(module, datamodule=SampleSet(num_samples=3))
    return trainer


def make(tiny_digits_dir, **kw):
    kw.setdefault("solver", DDIM(4))
    return RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), lr=0.05, **kw)


@pytest.mark.parametrize("mode", [ShortcutGradient(), TruncatedBackprop(k=2), TruncatedBackprop(random_k=True),
                                  TruncatedBackprop(k=1), FullBackprop(checkpoint=True)],
                         ids=["sdo", "alignprop_k2", "alignprop_uniform", "alignprop_1", "full_ckpt"])
def test_only_adapters_train_with_every_mode(mode, tiny_digits_dir, tmp_path):
    module = make(tiny_digits_dir, gradient_mode=mode)
    base = {k: v.clone() for k, v in module.backbone.network.state_dict().items() if "lora_" not in k}
    adapters = [p.detach().clone() for p in module.lora_params]
    fit(module, tmp_path, enable_checkpointing=False)
    after = module.backbone.network.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert any(not torch.equal(a, p) for a, p in zip(adapters, module.lora_params))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_exported_adapter_round_trip(tiny_digits_dir, tmp_path):
    module = make(tiny_digits_dir)
    trainer = fit(module, tmp_path, steps=2)
    out_dir = tmp_path / "lora"  # no logger: the default root dir
    assert (out_dir / lora.WEIGHTS_NAME).is_file()
    fresh = DigitsBackbone(tiny_digits_dir)
    lora.load_adapter(fresh.network, out_dir, "default")
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor(500)
    cond = torch.tensor([10, 10])
    with torch.no_grad():
        torch.testing.assert_close(fresh.denoise(x, t, cond), module.backbone.denoise(x, t, cond))
        plain = DigitsBackbone(tiny_digits_dir).denoise(x, t, cond)
    assert (plain - fresh.denoise(x, t, cond)).abs().max() > 1e-6  # the adapter changes the output
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])


def test_mixing_adapters_is_theta_plus_scaled_deltas(tmp_path):
    """theta + a*A + b*B on a linear layer, checked against the matrices read from the files."""
    torch.manual_seed(0)
    base_state = nn.Sequential(nn.Linear(5, 3)).state_dict()
    for name in ("a", "b"):
        net = nn.Sequential(nn.Linear(5, 3))
        net.load_state_dict(base_state)
        lora.add_lora(net, rank=2, alpha=4, target_modules=["0"])
        with torch.no_grad():
            for n, p in net.named_parameters():
                if "lora_" in n:
                    p.normal_()
        lora.save_adapter(net, tmp_path / name)
    base = nn.Sequential(nn.Linear(5, 3))
    base.load_state_dict(base_state)
    w, bias = base_state["0.weight"], base_state["0.bias"]
    lora.load_adapter(base, tmp_path / "a", "a")
    lora.load_adapter(base, tmp_path / "b", "b")
    lora.set_adapter_scales(base, {"a": 0.5, "b": -1.5})
    x = torch.randn(4, 5)
    expected = x @ w.T + bias
    for name, scale in (("a", 0.5), ("b", -1.5)):
        sd = load_file(str(tmp_path / name / lora.WEIGHTS_NAME))
        A = next(v for k, v in sd.items() if "lora_A" in k)
        B = next(v for k, v in sd.items() if "lora_B" in k)
        expected = expected + scale * (4 / 2) * x @ A.T @ B.T
    with torch.no_grad():
        torch.testing.assert_close(base(x), expected, rtol=1e-5, atol=1e-5)


def test_unknown_lora_targets_name_the_choices(tiny_digits_dir):
    with pytest.raises(ValueError, match="match no layer"):
        RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), lora_target_modules=["nope"])


def test_sdo_mix_writes_a_grid_whose_zero_row_is_the_base_model(tiny_digits_dir, tmp_path):
    from sdo_lightning.cli import main
    from sdo_lightning.sampling import sample

    net = DigitsBackbone(tiny_digits_dir)
    lora.add_lora(net.network, rank=2, alpha=2, target_modules=["conv1", "conv2"])
    with torch.no_grad():
        for n, p in net.network.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    lora.save_adapter(net.network, tmp_path / "a")
    out = tmp_path / "mix.png"
    main(["mix", "--adapters", str(tmp_path / "a"), "--digits", str(tiny_digits_dir), "--scales", "0", "1",
          "--num-samples", "2", "--steps", "3", "--out", str(out)])
    from PIL import Image

    assert Image.open(out).size[1] > 2 * 8
    # scale 0 is the base model: compare with plain sampling of an adapter-free backbone
    base = DigitsBackbone(tiny_digits_dir)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.full((2,), 10)
    with torch.no_grad():
        lora.load_adapter(net.network, tmp_path / "a", "b")
        lora.set_adapter_scales(net.network, {"b": 0.0})
        zero = sample(net.denoise, DDIM(3), x, cond, scheduler_config=net.scheduler_config)
        plain = sample(base.denoise, DDIM(3), x, cond, scheduler_config=base.scheduler_config)
        lora.set_adapter_scales(net.network, {"b": 1.0})
        one = sample(net.denoise, DDIM(3), x, cond, scheduler_config=net.scheduler_config)
    torch.testing.assert_close(zero, plain)
    assert (one - plain).abs().max() > 1e-4


@pytest.mark.parametrize("mode", [ShortcutGradient(num_kept=2), FullBackprop(checkpoint=True)], ids=["sdo", "full_ckpt"])
def test_folded_adapters_give_the_same_images_and_gradient(mode, tiny_digits_dir):
    results = []
    for fold in (False, True):
        module = RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(5),
                                  gradient_mode=mode, fold_adapters=fold)
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            for p in module.lora_params:  # non-zero adapters (B starts at 0)
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        module._plan_generator.manual_seed(1)
        batch = {"index": torch.arange(2), "class_label": torch.full((2,), 10)}
        images = module.generate(batch, grad=True)
        grads = torch.autograd.grad(module.objective(images, batch).sum(), module.lora_params)
        base = {k: v for k, v in module.backbone.network.state_dict().items() if "lora_" not in k}
        results.append((images.detach(), grads, base))
    (img_a, grad_a, base_a), (img_b, grad_b, base_b) = results
    torch.testing.assert_close(img_b, img_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(grad_a, grad_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(base_a[k], base_b[k]) for k in base_a)  # originals restored after sampling


def test_same_seed_same_images_and_gradients(tiny_digits_dir):
    """Determinism on CPU: two modules built with the same seeds give identical images and adapter
    gradients; another seed gives other ones."""
    def images_and_grads(seed):
        torch.manual_seed(0)  # LoRA's A matrices
        module = RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(4),
                                  seed=seed)
        with torch.no_grad():
            for p in module.lora_params:
                p.add_(0.1)  # B starts at 0: make every adapter matter
        batch = {"index": torch.arange(3), "class_label": torch.full((3,), 10)}
        images = module.generate(batch, grad=True)
        grads = torch.autograd.grad(module.objective(images, batch).sum(), module.lora_params)
        return images.detach(), grads

    (img_a, grad_a), (img_b, grad_b), (img_c, _) = (images_and_grads(s) for s in (3, 3, 4))
    torch.testing.assert_close(img_a, img_b, rtol=0, atol=0)
    for a, b in zip(grad_a, grad_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(img_a, img_c)


@pytest.mark.parametrize("eta", [0.0, 1.0], ids=["ddim", "stochastic"])
def test_a_samples_noise_does_not_depend_on_its_batch(eta, tiny_digits_dir):
    """Sample 2's image is the same whether it is sampled alone or with samples 0 and 1 (what lets
    DDP ranks split a batch), also with a stochastic solver (per-sample generators), and with DDIM
    equals plain sampling from the documented per-sample seed."""
    from sdo_lightning.sampling import sample

    module = RewardFineTuning(objective=Darkness(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(4, eta=eta),
                              seed=5)
    with torch.no_grad():
        together = module.generate({"index": torch.arange(3), "class_label": torch.full((3,), 10)}, grad=False)
        alone = module.generate({"index": torch.tensor([2]), "class_label": torch.full((1,), 10)}, grad=False)
        torch.testing.assert_close(alone[0], together[2], rtol=1e-5, atol=1e-6)
        if eta:
            return
        # independent: seed of (seed 5, step 0, micro-batch 0, index 2), one generator per sample
        seed = ((5 * 1_000_003 + 0) * 101 + 0) * 100_003 + 2
        x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        plain = DigitsBackbone(tiny_digits_dir)
        x0 = sample(plain.denoise, DDIM(4), x, torch.full((1,), 10), scheduler_config=plain.scheduler_config)
        torch.testing.assert_close(alone, plain.decode(x0), rtol=1e-5, atol=1e-6)


def test_accumulated_micro_batches_draw_different_noise(tiny_digits_dir, tmp_path):
    seen = []

    class Record(Objective, register=False):
        def forward(self, images, batch):
            seen.append(images.detach().clone())
            return images.flatten(1).mean(1)

    module = RewardFineTuning(objective=Record(), backbone=DigitsBackbone(tiny_digits_dir), solver=DDIM(3), lr=0.05)
    Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, accumulate_grad_batches=2, default_root_dir=tmp_path).fit(
        module, datamodule=SampleSet(num_samples=2))
    assert len(seen) == 4  # 2 steps x 2 micro-batches of the same two samples
    assert not torch.allclose(seen[0], seen[1])  # fresh noise for each micro-batch of a step
