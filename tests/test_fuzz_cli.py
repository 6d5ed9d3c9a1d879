"""Fuzz the `sdo fit` surface: mutated shipped configs and random argument lists are parsed and
instantiated (run=False, no training). Every failure must be a clean error: the parser's exit
with one `error:` line, or bad input whose innermost exception is one of the project's clean
error types with a one-line message -- never a TypeError/AttributeError/KeyError from deep inside."""

import copy

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sdo_lightning.cli import clean_message, main  # noqa: E402

from test_cli import ROOT  # noqa: E402

BASES = {p.name: yaml.safe_load(p.read_text()) for p in
         (ROOT / "configs" / "quickstart.yaml", ROOT / "configs" / "digits" / "finetune_lora.yaml")}
NAMES = ["LatentOptimization", "RewardFineTuning", "SampleSet", "PromptSet", "DDIM", "LCMMultistep",
         "DPMSolverPlusPlus", "ShortcutGradient", "FullBackprop", "TruncatedBackprop", "ClassifierObjective",
         "L2Fidelity", "WeightedSum", "DigitsBackbone", "NoSuchThing", "os.system", "torch.nn.Linear", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 100), st.floats(-1e3, 1e3), st.just(float("nan")),
                    st.sampled_from(NAMES), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(["class_path", "init_args", "x", "lr"]), inner, max_size=2)),
                      max_leaves=4)
KEYS = ["--model", "--model.lr", "--model.seed", "--model.target", "--model.solver", "--model.solver.num_inference_steps",
        "--model.solver.eta", "--model.gradient_mode", "--model.gradient_mode.num_kept", "--model.objective",
        "--model.backbone", "--model.backbone.path", "--model.on_nonfinite", "--model.target.linf_radius", "--data",
        "--data.num_samples", "--data.class_label", "--data.prompts", "--data.batch_size", "--trainer.max_steps",
        "--trainer.accumulate_grad_batches", "--trainer.precision", "--seed_everything", "--ckpt_path", "--nonsense"]
argv_values = st.one_of(st.sampled_from(NAMES), st.integers(-2, 20).map(str), st.sampled_from(
    ["null", "[]", "{}", "x_t", "embedding", "0.5", "nan", "[1, 2]", "{class_path: DDIM}", "skip", "stop"]))


LEAKS = ("unhashable type", "object has no attribute", "Subclass types expect one of", "Traceback")


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_config(draw):
    config = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(config))
        path = draw(st.sampled_from(paths))
        parent = config
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["foo", "lr", "init_args", "class_path", "steps"]))] = draw(values)
    return config


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(config=mutated_config(), args=st.lists(st.tuples(st.sampled_from(KEYS), argv_values), max_size=2))
def test_every_failure_is_a_clean_error(config, args, tiny_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["--config", str(path), "--trainer.logger", "false", *[x for pair in args for x in pair]]
    try:
        main(argv, run=False)
    except SystemExit as exit_info:
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert exit_info.code != 0 and len(errors) == 1, err[-2000:]
        assert len(errors[0]) < 1000, errors[0]
        # Python's internals leaking through the parser are not an explanation
        assert not any(leak in errors[0] for leak in LEAKS), errors[0]
    except Exception as exc:  # noqa: BLE001 - the point is to classify every exception
        message = clean_message(exc)
        assert message is not None, f"{type(exc).__name__} is not a clean error for {argv}: {exc}"
        assert "\n" not in message, message
    capsys.readouterr()


# -- validate, test, predict and sdo mix: run for real on a tiny fitted model ---------------------

EVAL_KEYS = ["--ckpt_path", "--model.adapter", "--data.eval_samples", "--data.eval_batch_size", "--data.eval_seed",
             "--data.eval_class_label", "--data.eval_reference_class_label", "--model.evaluation.kid_subset_size",
             "--model.evaluation.features", "--model.solver.num_inference_steps", "--model.lora_rank",
             "--seed_everything", "--trainer.limit_predict_batches", "--nonsense"]
MIX_KEYS = ["--scales", "--weights", "--num-samples", "--steps", "--seed", "--class-label", "--guidance", "--out",
            "--adapters", "--digits"]


@pytest.fixture(scope="module")
def fitted_run(tiny_digits_dir, tmp_path_factory):
    """A 2-step LoRA fit, its checkpoint and adapter, plus damaged copies of both."""
    import os

    from test_evaluation import evaluation_args, write_config

    root = tmp_path_factory.mktemp("fuzz_eval")
    config = write_config(root / "config.yaml", tiny_digits_dir)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["fit", "--config", str(config), *evaluation_args(tiny_digits_dir), "--trainer.val_check_interval", "2"])
    finally:
        os.chdir(cwd)
    run = root / "runs" / "lightning_logs" / "version_0"
    damaged = root / "damaged"
    damaged.mkdir()
    (damaged / "random.ckpt").write_bytes(bytes(range(256)) * 8)
    (damaged / "empty.ckpt").write_bytes(b"")
    lora_copy = damaged / "lora"
    lora_copy.mkdir()
    for f in (run / "lora").iterdir():
        lora_copy.joinpath(f.name).write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])
    return root, config, run / "checkpoints" / "last.ckpt", run / "lora", damaged


def _eval_values(fitted_run, tiny_digits_dir):
    root, _, ckpt, adapter, damaged = fitted_run
    paths = [str(ckpt), str(adapter), str(damaged / "random.ckpt"), str(damaged / "empty.ckpt"), str(damaged / "lora"),
             str(root / "missing"), str(root), "last", str(tiny_digits_dir / "classifier")]
    return st.one_of(st.sampled_from(paths), st.integers(-2, 6).map(str), st.sampled_from(
        ["null", "0", "nan", "-1", str(10**12), str(2**70), "abc", "[1, 2]", "{}", "1.5", "DDIM"]))


def _check_clean(exc_or_exit, capsys, argv):
    if isinstance(exc_or_exit, SystemExit):
        err = capsys.readouterr().err
        if exc_or_exit.code in (0, None):
            return
        text = exc_or_exit.code if isinstance(exc_or_exit.code, str) else None
        # the sdo parser's "error: ...", argparse's "sdo mix: error: ..." (sdo mix's own parser)
        errors = ([line for line in err.splitlines() if line.startswith(("error:", "sdo mix: error:"))]
                  if text is None else [text])
        assert len(errors) == 1 and "\n" not in errors[0] and len(errors[0]) < 1000, (argv, err[-2000:])
        assert not any(leak in errors[0] for leak in LEAKS), errors[0]
        return
    message = clean_message(exc_or_exit)
    assert message is not None, f"{type(exc_or_exit).__name__} is not a clean error for {argv}: {exc_or_exit}"
    assert "\n" not in message, message
    # a sentence, not a bare library key ("KeyError: .txt")
    assert len(message.split(": ", 1)[-1].split()) >= 4, (argv, message)


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_commands_end_cleanly(subcommand, fitted_run, tiny_digits_dir, tmp_path, monkeypatch, capsys):
    from test_evaluation import evaluation_args

    root, config, ckpt, adapter, damaged = fitted_run
    monkeypatch.chdir(root)
    files = [None, str(ckpt), str(adapter), str(damaged / "random.ckpt"), str(damaged / "empty.ckpt"),
             str(damaged / "lora"), str(root / "missing"), str(root)]

    # a checkpoint and an adapter drawn from good, damaged and wrong files, and up to 2 other options
    @settings(max_examples=10, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(ckpt_path=st.sampled_from(files + ["last"]), adapter=st.sampled_from(files),
           args=st.lists(st.tuples(st.sampled_from(EVAL_KEYS), _eval_values(fitted_run, tiny_digits_dir)),
                         max_size=2))
    def check(ckpt_path, adapter, args):
        chosen = [*(["--ckpt_path", ckpt_path] if ckpt_path else []), *(["--model.adapter", adapter] if adapter else [])]
        argv = [subcommand, "--config", str(config), *evaluation_args(tiny_digits_dir), "--data.eval_samples", "2",
                *chosen, *[x for pair in args for x in pair]]
        try:
            main(argv)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the point is to classify every exception
            _check_clean(exc, capsys, argv)
        capsys.readouterr()

    check()


def test_mix_ends_cleanly(fitted_run, tiny_digits_dir, tmp_path, monkeypatch, capsys):
    root, _, _, adapter, damaged = fitted_run
    monkeypatch.chdir(tmp_path)
    values = st.one_of(st.sampled_from([str(adapter), str(damaged / "lora"), str(damaged / "random.ckpt"),
                                        str(tiny_digits_dir), ".", "m.txt", "out.png", "sub/out.png", "nan", "inf",
                                        "-1", "0", "1e9", "abc", ""]),
                       st.integers(-2, 4).map(str), st.floats(-3, 3).map(lambda f: f"{f:.2f}"))

    # each option with values of its own kind (odd ones included), or any value
    own = {"--scales": st.sampled_from(["nan", "inf", "-1", "0", "1e9", "0.5"]),
           "--weights": st.sampled_from(["nan", "1", "-inf", "0"]),
           "--num-samples": st.sampled_from(["0", "-1", "1", str(10**12)]),
           "--steps": st.sampled_from(["0", "-3", "1", "2"]),
           "--out": st.sampled_from([".", "m.txt", "noext", "out.png", "sub/out.png", str(tmp_path)]),
           "--adapters": st.sampled_from([str(adapter), str(damaged / "lora"), str(damaged / "random.ckpt"),
                                          str(tmp_path / "missing")])}
    pair = st.sampled_from(MIX_KEYS).flatmap(lambda key: st.tuples(st.just(key), st.one_of(own.get(key, values), values)))

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(args=st.lists(pair, max_size=3))
    def check(args):
        argv = ["mix", "--adapters", str(adapter), "--digits", str(tiny_digits_dir), "--steps", "2",
                "--num-samples", "2", *[x for pair in args for x in pair]]
        try:
            main(argv)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the point is to classify every exception
            _check_clean(exc, capsys, argv)
        capsys.readouterr()

    check()
