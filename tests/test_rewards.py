"""The rewards users optimize today: HPSv2.1 (HPSv2Score, open_clip faked).

Reference values come from another code path: the checkpoint's tiny open_clip model evaluated by hand.
"""

import pytest
import torch

from objective_fixtures import assert_one_sentence, rand
from sdo_lightning.objectives import HPSv2Score
from tiny_objective_models import TinyOpenCLIP, install_fake_open_clip, save, tiny_tokenize


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
