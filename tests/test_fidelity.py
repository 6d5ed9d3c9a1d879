"""benchmarks/fidelity.py's core: the per-call decomposition against the gradient modes run
through ``sample``, and the mode table against formulas written out here."""

import _fidelity_core as core  # benchmarks/ is on the path in tests (pyproject: pythonpath)
import _fidelity_explain as explain
import numpy as np
import pytest
import torch

from sdo_lightning import Target, sample
from sdo_lightning.backbones import DigitsBackbone
from sdo_lightning.gradient_modes import DRTune, FullBackprop, ShortcutGradient, TruncatedBackprop
from sdo_lightning.solvers import DDIM, DPMSolverPlusPlus

N = 6


@pytest.fixture(scope="module")
def lora_setting(tiny_digits_dir):
    backbone = DigitsBackbone(str(tiny_digits_dir))
    names = core.lora_names(backbone)
    with torch.no_grad():  # B off zero, so that both LoRA factors carry gradient
        gen = torch.Generator().manual_seed(1)
        for name, p in backbone.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return core.make_setting(backbone, DDIM(N), batch=2), names


def _mode_grad(setting, mode, params, plan_seed, cond=None):
    """The gradient of ``mode`` run through ``sample``, and the calls that kept a graph."""
    b = setting.backbone
    kept = []

    def denoiser(x, t, c):
        out = b.denoise(x, t, c)
        kept.append(out.requires_grad)
        return out

    x0 = sample(denoiser, setting.solver, setting.x, setting.cond if cond is None else cond, gradient_mode=mode,
                target=Target.parameters(), scheduler_config=b.scheduler_config,
                plan_generator=torch.Generator().manual_seed(plan_seed))
    grads = torch.autograd.grad(core.loss_of_images(b.decode(x0)), params, allow_unused=True)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])
    return flat, [i for i, k in enumerate(kept) if k]


def test_per_call_terms_rebuild_every_mode(lora_setting):
    """Sums of the two passes' per-call terms equal each mode's own gradient, draw by draw."""
    setting, names = lora_setting
    params = [p for n, p in setting.backbone.unet.named_parameters() if "lora_" in n]
    exact_terms = core.per_call_terms(setting, "lora", False, names)
    sg_terms = core.per_call_terms(setting, "lora", True, names)
    scale = exact_terms.sum(0).norm()

    def close(a, b):
        assert (a - b).norm() <= 1e-5 * scale + 1e-9

    close(_mode_grad(setting, FullBackprop(), params, 0)[0], exact_terms.sum(0))
    close(_mode_grad(setting, TruncatedBackprop(k=2), params, 0)[0], exact_terms[N - 2:].sum(0))
    seen = set()
    for seed in range(2):
        got, kept = _mode_grad(setting, ShortcutGradient(), params, seed)
        close(got, sg_terms[kept[0]])
        seen.add(kept[0])
        got, kept = _mode_grad(setting, ShortcutGradient(num_kept=2), params, seed)
        close(got, sg_terms[kept].sum(0))
        got, kept = _mode_grad(setting, DRTune(k=2), params, seed)
        close(got, sg_terms[kept].sum(0))
    assert len(seen) > 1
    # the two passes differ here: the test can tell the exact chain from the stop-gradient one
    assert (exact_terms.sum(0) - sg_terms.sum(0)).norm() > 1e-3 * scale


def test_embedding_terms_rebuild_exact_and_sdo(tiny_digits_dir):
    backbone = DigitsBackbone(str(tiny_digits_dir))
    setting = core.make_setting(backbone, DPMSolverPlusPlus(4), batch=2)
    exact_terms = core.per_call_terms(setting, "embedding", False)
    sg_terms = core.per_call_terms(setting, "embedding", True)
    emb = backbone.condition_embedding(setting.cond).requires_grad_(True)
    got, _ = _mode_grad(setting, FullBackprop(), [emb], 0, cond=emb)
    torch.testing.assert_close(got, exact_terms.sum(0), rtol=1e-5, atol=1e-7)
    got, kept = _mode_grad(setting, ShortcutGradient(), [emb], 3, cond=emb)
    torch.testing.assert_close(got, sg_terms[kept[0]], rtol=1e-5, atol=1e-7)


def test_mode_table_matches_formulas():
    """Cosines and norm ratios of the expectations, from random per-call terms, against numpy."""
    gen = torch.Generator().manual_seed(0)
    n = 10
    exact_terms = torch.randn(n, 7, generator=gen, dtype=torch.float64)
    sg_terms = torch.randn(n, 7, generator=gen, dtype=torch.float64)
    table = core.parameter_modes(exact_terms, sg_terms)
    e, s = exact_terms.numpy(), sg_terms.numpy()
    exact = e.sum(0)

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    assert table["SDO"]["cos_expect"] == pytest.approx(cos(s.mean(0), exact), abs=1e-12)
    assert table["SDO"]["ratio_expect"] == pytest.approx(np.linalg.norm(s.mean(0)) / np.linalg.norm(exact), rel=1e-12)
    assert table["SDO unbiased"]["ratio_expect"] == pytest.approx(np.linalg.norm(s.sum(0)) / np.linalg.norm(exact), rel=1e-12)
    assert table["SDO"]["cos_draw"] == pytest.approx(np.mean([cos(t, exact) for t in s]), abs=1e-12)
    # AlignProp-uniform: K uniform on 1..N keeps call i (0-based) when K >= N - i: weight (i + 1) / N
    weights = (np.arange(n) + 1) / n
    assert table["AlignProp-uniform"]["cos_expect"] == pytest.approx(cos((weights[:, None] * e).sum(0), exact), abs=1e-12)
    assert table["Truncated K=2"]["cos_expect"] == pytest.approx(cos(e[-2:].sum(0), exact), abs=1e-12)
    # DRTune(k=5) on 10 calls: offsets 0, 1; kept {0,2,4,6,8} or {1,3,5,7,9}
    dr = [s[0::2].sum(0), s[1::2].sum(0)]
    assert table["DRTune(k=5)"]["cos_expect"] == pytest.approx(cos((dr[0] + dr[1]) / 2, exact), abs=1e-12)
    assert table["DRTune(k=5)"]["cos_draw"] == pytest.approx((cos(dr[0], exact) + cos(dr[1], exact)) / 2, abs=1e-12)
    assert table["SDO num_kept=2"]["cos_expect"] == pytest.approx(cos(s.sum(0), exact), abs=1e-12)
    assert table["exact"]["cos_expect"] == pytest.approx(1.0)


def test_stop_gradient_chain_is_sdo_and_its_surrogate_derivative(tiny_digits_dir):
    """Eq. 18-19 by a loop over the diffusers scheduler: SDO's latent gradient, and a central
    finite difference of the surrogate (later outputs frozen) matches its directional derivative."""
    backbone = DigitsBackbone(str(tiny_digits_dir))
    setting = core.make_setting(backbone, DDIM(5), batch=2)
    result = explain.eq18_check(setting)
    assert result["rel_diff_sdo_vs_chain"] < 1e-10
    assert result["fd_surrogate"] == pytest.approx(result["sdo_directional"], rel=1e-5, abs=1e-8)
    assert result["exact_directional"] != pytest.approx(result["sdo_directional"], rel=1e-3)


def test_depth_norms_skip_path_is_the_ddim_product(tiny_digits_dir):
    """With every network output held constant the DDIM chain is x_{i+1} = sqrt(abar_prev / abar_t)
    x_i + c eps, so ||dL/dx_T|| is prod sqrt(abar_prev / abar_t) times ||dL/dx_0||."""
    backbone = DigitsBackbone(str(tiny_digits_dir))
    solver = DDIM(4)
    setting = core.make_setting(backbone, solver, batch=1)
    norms = explain.depth_norms(setting)
    abar = solver.build_scheduler(backbone.scheduler_config).alphas_cumprod.double()
    ts = [750, 500, 250, 0]  # leading spacing, 4 of 1000 steps
    prod = 1.0
    for t in ts:
        prev = t - 250
        prod *= float(torch.sqrt((abar[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)) / abar[t]))
    skip = norms["skip path only"]
    assert skip[-1] == pytest.approx(prod * skip[0], rel=1e-4)
    assert len(norms["exact"]) == 5 and norms["exact"][0] == pytest.approx(skip[0], rel=1e-6)
