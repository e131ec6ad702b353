"""The paper's recipes (`--recipe paper_baseline`, `paper_bn_accelerated_x5`/`_x30`): their values
against the papers' numbers, each change of section 4.2.1 on its own, their layering under
`--config` and the command line, `--help`, and the two options they brought: GoogLeNet's
staircase decay and the L2 form of weight decay."""

import math
import os

import keras
import numpy as np
import pytest
import yaml

from bnzoo import recipes
from bnzoo.config import RECIPES, TrainConfig, build_train_parser, parse_train_args, save_config
from bnzoo.optimization import WarmupSchedule, build_optimizer, build_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_RECIPES = ("paper_baseline", "paper_bn_accelerated_x5", "paper_bn_accelerated_x30")


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


# --- The recipes' values ------------------------------------------------------------------------


def test_the_baseline_is_inceptions_training_as_the_papers_give_it():
    config = TrainConfig(recipe="paper_baseline").resolved()
    # BN paper section 4.2 and Figure 3: momentum SGD, batches of 32, Inception's rate 0.0015.
    assert (config.optimizer, config.batch_size, config.lr) == ("sgd", 32, 0.0015)
    # GoogLeNet section 6: momentum 0.9, "decreasing the learning rate by 4% every 8 epochs".
    assert (config.momentum, config.lr_schedule) == (0.9, "exponential")
    assert (config.lr_decay_rate, config.lr_decay_epochs, config.warmup_epochs) == (0.96, 8, 0)
    # Caffe's bvlc_googlenet solver: weight_decay 0.0002, an L2 term through momentum.
    assert (config.weight_decay, config.weight_decay_form) == (2e-4, "l2")
    # GoogLeNet's 40% dropout and LRN, on the paper's network.
    assert config.model == "bn_inception"
    assert config.model_args == {"dropout_rate": 0.4, "lrn": True}
    assert config.shuffle_buffer == TrainConfig.default("shuffle_buffer")
    assert config.normalization == "batch_norm"  # BN-Baseline; --normalization none: Inception


@pytest.mark.parametrize(
    "name, rate", [("paper_bn_accelerated_x5", 0.0075), ("paper_bn_accelerated_x30", 0.045)]
)
def test_the_accelerated_recipes_apply_every_change_of_section_4_2_1(name, rate):
    baseline = TrainConfig(recipe="paper_baseline").resolved()
    config = TrainConfig(recipe=name).resolved()
    assert config.lr == rate == pytest.approx(baseline.lr * int(name.rsplit("_x", 1)[1]))
    assert config.model_args["dropout_rate"] == 0  # "Remove Dropout"
    assert config.weight_decay == pytest.approx(baseline.weight_decay / 5)  # "by a factor of 5"
    assert config.lr_decay_epochs == pytest.approx(baseline.lr_decay_epochs / 6)  # "6 times faster"
    assert config.model_args["lrn"] is False  # "Remove Local Response Normalization"
    assert config.shuffle_buffer >= 60_000  # the whole training split, capped at its size
    assert config.augment is False  # no photometric distortions to reduce
    # Everything else is the baseline's.
    changed = {"lr", "model_args", "weight_decay", "lr_decay_epochs", "shuffle_buffer"}
    for key, value in baseline.to_dict().items():
        if key not in changed | {"recipe"}:
            assert config.to_dict()[key] == value, key


def test_the_decay_is_six_times_faster_in_every_epoch():
    # 4% every 8/6 epochs falls like 0.96**6 every 8 epochs (at every 8-epoch boundary).
    slow = build_schedule(TrainConfig(recipe="paper_baseline", epochs=40), steps_per_epoch=6)
    fast = build_schedule(TrainConfig(recipe="paper_bn_accelerated_x5", epochs=40), 6)
    for step in (0, 48, 96, 144):
        ratio = float(fast(step)) / float(slow(step)) / 5
        assert ratio == pytest.approx(0.96 ** (5 * step / 48), rel=1e-5)


@pytest.mark.parametrize("change", recipes.ACCELERATING_CHANGES, ids=lambda c: c.title)
def test_each_change_switches_on_its_own(change):
    others = [c for c in recipes.ACCELERATING_CHANGES if c is not change]
    without = recipes.accelerated(5, others)
    full = recipes.accelerated(5)
    flat = {**{k: v for k, v in full.items() if k != "model_args"}, **full["model_args"]}
    flat_without = {
        **{k: v for k, v in without.items() if k != "model_args"},
        **without["model_args"],
    }
    baseline = {
        **{k: v for k, v in recipes.BASELINE.items() if k != "model_args"},
        **recipes.BASELINE["model_args"],
    }
    touched = {option.removeprefix("model_args.") for option in change.concerns()} - {"lr"}
    # Leaving the change out puts exactly its options back to the baseline's.
    for key in flat:
        expected = baseline[key] if key in touched else flat[key]
        assert flat_without[key] == expected, key
    assert not change.values or flat_without != flat


def test_a_change_is_switched_off_from_the_command_line():
    config = parse_train_args(["--recipe", "paper_bn_accelerated_x5", "--model-arg", "lrn=true"])
    assert config.model_args == {"dropout_rate": 0.0, "lrn": True}
    config = parse_train_args(["--recipe", "paper_bn_accelerated_x5", "--shuffle-buffer", "10000"])
    assert (config.shuffle_buffer, config.lr) == (10000, 0.0075)


def test_the_docs_table_of_the_changes_is_generated_from_the_recipes():
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as stream:
        assert recipes.recipes_table() in stream.read()


# --- Layering -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_a_paper_recipe_lies_under_the_config_file_and_the_command_line(name, tmp_path):
    recipe = RECIPES[name].values
    path = write_yaml(tmp_path / "run.yaml", {"recipe": name, "lr": 0.01, "batch_size": 64})
    config = parse_train_args(["--config", path, "--batch-size", "16"]).resolved()
    assert config.lr == 0.01  # the file over the recipe
    assert config.batch_size == 16  # the command line over the file
    assert config.weight_decay == recipe["weight_decay"]  # the recipe over the default
    assert config.lr_decay_epochs == recipe["lr_decay_epochs"]
    assert TrainConfig.default("lr_decay_epochs") is None


def test_model_args_merge_with_the_recipes_key_by_key(tmp_path):
    path = write_yaml(
        tmp_path / "run.yaml", {"recipe": "paper_baseline", "model_args": {"min_depth": 8}}
    )
    config = parse_train_args(
        ["--config", path, "--model-arg", "width_multiplier=0.25", "--model-arg", "lrn=false"]
    )
    assert config.model_args == {
        "dropout_rate": 0.4,  # the recipe's
        "lrn": False,  # the command line's over the recipe's
        "min_depth": 8,  # the file's
        "width_multiplier": 0.25,  # the command line's
    }
    # Only what the user set is chosen: dropping the recipe drops its model arguments.
    (tmp_path / "run").mkdir()
    saved = yaml.safe_load(open(save_config(config, tmp_path / "run")).read())
    assert saved["model_args"] == {"min_depth": 8, "width_multiplier": 0.25, "lrn": False}
    assert saved["resolved"]["model_args"]["dropout_rate"] == 0.4
    rerun = parse_train_args(
        ["--config", str(tmp_path / "run" / "config.yaml"), "--recipe", "none"]
    )
    assert rerun.model_args == {"min_depth": 8, "width_multiplier": 0.25, "lrn": False}


def test_a_python_config_merges_its_model_args_with_the_recipes():
    config = TrainConfig(recipe="paper_bn_accelerated_x5", model_args={"activation": "sigmoid"})
    assert config.model_args == {"dropout_rate": 0.0, "lrn": False, "activation": "sigmoid"}
    assert config.chosen() == {
        "recipe": "paper_bn_accelerated_x5",
        "model_args": {"activation": "sigmoid"},
    }
    config.model_args = {"lrn": True}  # set whole, after construction: chosen whole
    assert config.chosen()["model_args"] == {"lrn": True}


# --- Discoverability ----------------------------------------------------------------------------


def test_help_lists_every_recipe_with_what_it_sets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(["--recipe", "paper_bn_accelerated_x5", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "recipes (--recipe NAME" in text
    for name in PAPER_RECIPES:
        assert f"  {name}: " in text
    assert "--lr 0.045" in text and "--model-arg lrn=False" in text
    assert "--weight-decay 0.0002" in text and "--weight-decay-form l2" in text
    # A flag and its value are never split over two lines.
    listing = text[text.index("recipes (--recipe NAME") :].splitlines()
    assert all(not line.rstrip().endswith(("--lr", "--model-arg")) for line in listing)


def test_an_unknown_recipe_name_suggests_the_close_ones():
    from bnzoo.cli import UsageError

    with pytest.raises(UsageError, match="did you mean 'paper_bn_accelerated_x5'"):
        parse_train_args(["--recipe", "paper_bn_accelerated_x"])


def test_the_parser_knows_every_paper_recipe():
    parser = build_train_parser()
    assert set(PAPER_RECIPES) <= set(RECIPES)
    assert "recipes (--recipe NAME" in parser.epilog


# --- The staircase and the L2 form --------------------------------------------------------------


@pytest.mark.multi_backend
def test_a_staircase_drops_the_rate_once_every_so_many_steps():
    schedule = WarmupSchedule(
        0.1,
        warmup_steps=5,
        total_steps=200,
        decay="exponential",
        decay_rate=0.96,
        steps_per_epoch=10,
        staircase_steps=12.5,
    )
    for step in (0, 4, 5, 17, 18, 30, 31, 199):
        t = max(step - 5, 0)
        expected = 0.1 * (step + 1) / 5 if step < 5 else 0.1 * 0.96 ** math.floor(t / 12.5)
        actual = float(keras.ops.convert_to_numpy(schedule(step)))
        assert actual == pytest.approx(expected, rel=1e-6), step
    clone = WarmupSchedule.from_config(schedule.get_config())
    assert clone.get_config()["staircase_steps"] == 12.5


def test_lr_decay_epochs_sets_the_staircase_in_epochs():
    config = TrainConfig(lr_schedule="exponential", lr_decay_epochs=8, warmup_epochs=0, epochs=20)
    schedule = build_schedule(config, steps_per_epoch=5)
    assert schedule.staircase_steps == 40
    assert (
        build_schedule(TrainConfig(lr_schedule="exponential", warmup_epochs=0), 5).staircase_steps
        is None
    )
    assert TrainConfig(lr_decay_epochs=8).ignored_settings() == [
        "--lr-decay-epochs 8 has no effect with --lr-schedule cosine (it is the exponential "
        "schedule's staircase)"
    ]


def _small_model():
    import layers

    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,))
    x = keras.layers.Dense(5, name="hidden")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def test_the_l2_form_adds_half_the_coefficient_times_the_squared_kernels_to_the_loss():
    model = _small_model()
    config = TrainConfig(weight_decay=0.01, weight_decay_form="l2", warmup_epochs=0, epochs=2)
    optimizer = build_optimizer(config, model, steps_per_epoch=5)
    assert not optimizer.weight_decay  # no decoupled decay on top
    kernels = [model.get_layer(name).kernel.numpy() for name in ("hidden", "logits")]
    expected = 0.01 / 2 * sum(float(np.sum(k**2)) for k in kernels)
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-6)


def test_the_l2_form_decays_through_momentum_as_caffe_does():
    """Caffe's SGD: v <- m v - lr (g + wd w); w <- w + v. With a zero data gradient only the
    L2 term moves the kernels; gamma, beta and the biases stay put."""
    import tensorflow as tf

    model = _small_model()
    lr, momentum, wd = 0.1, 0.9, 0.05
    config = TrainConfig(
        lr=lr,
        momentum=momentum,
        weight_decay=wd,
        weight_decay_form="l2",
        lr_schedule="constant",
        warmup_epochs=0,
        epochs=2,
    )
    optimizer = build_optimizer(config, model, steps_per_epoch=5)
    before = {v.path: v.numpy() for v in model.trainable_variables}
    expected, velocity = dict(before), {path: 0.0 for path in before}
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.add_n(model.losses)  # the data loss's gradient is zero here
        gradients = tape.gradient(loss, model.trainable_variables)
        gradients = [
            tf.zeros_like(v) if g is None else g
            for g, v in zip(gradients, model.trainable_variables, strict=True)
        ]
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        for variable in model.trainable_variables:
            path = variable.path
            decay = wd * expected[path] if len(variable.shape) > 1 else 0.0
            velocity[path] = momentum * velocity[path] - lr * decay
            expected[path] = expected[path] + velocity[path]
    for variable in model.trainable_variables:
        np.testing.assert_allclose(
            variable.numpy(), expected[variable.path], rtol=1e-5, err_msg=variable.path
        )
        if len(variable.shape) == 1:
            np.testing.assert_array_equal(variable.numpy(), before[variable.path])


def test_the_decoupled_form_leaves_the_loss_alone():
    model = _small_model()
    optimizer = build_optimizer(TrainConfig(weight_decay=0.01), model, steps_per_epoch=5)
    assert model.losses == [] and optimizer.weight_decay == 0.01


# --- The recipes' model arguments build the paper's networks -----------------------------------


def test_the_recipes_model_arguments_build_inception_and_bn_x5_sigmoid():
    import models

    small = dict(input_shape=(64, 64, 1), classes=10, width_multiplier=0.05, min_depth=4)
    baseline = RECIPES["paper_baseline"].values["model_args"]
    inception = models.create_model("bn_inception", normalization=None, **baseline, **small)
    names = [layer.name for layer in inception.layers]
    assert {"pool1_norm1", "conv2_norm2"} <= set(names)
    assert inception.get_layer("dropout").rate == 0.4
    assert inception.get_layer("inception_3a_output").output.shape[1:3] == (8, 8)

    accelerated = RECIPES["paper_bn_accelerated_x5"].values["model_args"]
    sigmoid = models.create_model(
        "bn_inception", **{**accelerated, "activation": "sigmoid"}, **small
    )
    names = [layer.name for layer in sigmoid.layers]
    assert "pool1_norm1" not in names and "conv1_7x7_s2_sigmoid" in names
    assert not any(name.endswith("_relu") for name in names)
    with pytest.raises(ValueError, match="Unknown activation='tanh'"):
        models.create_model("bn_inception", activation="tanh", **small)
