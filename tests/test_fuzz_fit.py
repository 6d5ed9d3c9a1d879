"""Fuzz every option of both modules (and their data modules, targets, solver and gradient mode)
with bad values, and run `sdo fit` for real on a tiny model: each run either ends in one clean
error line or trains and finishes with finite results -- never a traceback."""

import inspect
import json
import math

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sdo_lightning.cli import clean_message, main  # noqa: E402
from sdo_lightning.training.data import PromptSet, SampleSet  # noqa: E402
from sdo_lightning.gradient_modes import ShortcutGradient, TruncatedBackprop  # noqa: E402
from sdo_lightning.modules.latent_optimization import LatentOptimization  # noqa: E402
from sdo_lightning.modules.reward_finetuning import RewardFineTuning  # noqa: E402
from sdo_lightning.solvers import DDIM  # noqa: E402
from sdo_lightning.modules.targets import StartNoise  # noqa: E402

OBJECTIVE = {"class_path": "ClassifierObjective", "init_args": {"target_class": 3}}
BASES = {
    "latent": {"model": {"class_path": "LatentOptimization", "init_args": {
        "objective": OBJECTIVE, "solver": {"class_path": "DDIM", "init_args": {"num_inference_steps": 2}}}},
        "data": {"class_path": "SampleSet", "init_args": {"num_samples": 2}}},
    "lora": {"model": {"class_path": "RewardFineTuning", "init_args": {
        "objective": OBJECTIVE, "solver": {"class_path": "DDIM", "init_args": {"num_inference_steps": 2}}}},
        "data": {"class_path": "SampleSet", "init_args": {"num_samples": 2}}},
}


def _options(prefix, cls, skip=("objective", "backbone", "optimizer", "held_out_objective")):
    return [f"{prefix}.{name}" for name in inspect.signature(cls.__init__).parameters
            if name not in ("self", *skip) and not name.startswith("_")]


#: every option of the modules and what they are built from
KEYS = {
    "latent": _options("--model", LatentOptimization) + _options("--data", SampleSet)
    + _options("--model.target", StartNoise) + _options("--model.solver", DDIM)
    + _options("--model.gradient_mode", ShortcutGradient),
    "lora": _options("--model", RewardFineTuning) + _options("--data", SampleSet)
    + _options("--model.solver", DDIM) + _options("--model.gradient_mode", TruncatedBackprop),
}
KEYS = {k: [key for key in v if not key.endswith((".target", ".solver", ".gradient_mode"))] for k, v in KEYS.items()}
BAD = st.sampled_from(["-1", "0", "-0.5", "1e9", "nan", "inf", "null", "[]", "{}", "abc", "true", "[1, 2]", "''",
                       "{class_path: DDIM}", "2.5", "-100"])


def _finite(tree):
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    return not isinstance(tree, float) or math.isfinite(tree)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_bad_values_end_in_one_line_or_a_finished_run(data, tiny_weights, tmp_path_factory, monkeypatch, capsys):
    module = data.draw(st.sampled_from(sorted(BASES)))
    args = data.draw(st.lists(st.tuples(st.sampled_from(KEYS[module]), BAD), min_size=1, max_size=2))
    folder = tmp_path_factory.mktemp("fuzz")
    monkeypatch.chdir(folder)
    (folder / "c.yaml").write_text(yaml.safe_dump(BASES[module]))
    argv = ["fit", "--config", str(folder / "c.yaml"), *[x for pair in args for x in pair],
            "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    try:
        main(argv)
    except SystemExit as exit_info:  # the parser's own exit
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert exit_info.code != 0 and len(errors) == 1 and "Traceback" not in err, (argv, err[-2000:])
        return
    except Exception as exc:  # noqa: BLE001 - the point is to classify every exception
        message = clean_message(exc)
        assert message is not None, f"{type(exc).__name__} is not a clean error for {argv}: {exc}"
        assert "\n" not in message, message
        return
    # accepted: the run finished and what it reports is finite
    for summary in folder.rglob("summary.json"):
        assert _finite(json.loads(summary.read_text())), (argv, summary.read_text())
