"""train.py's configuration: flags, `--config run.yaml`, recipes, derived defaults, the saved
config and the run folder's identity. No TensorFlow needed: these run in milliseconds."""

import datetime
import json
import os
import subprocess
import zipfile

import pytest
import yaml

from bnzoo import config as config_module
from bnzoo.cli import UsageError
from bnzoo.config import (
    TrainConfig,
    build_train_parser,
    default_output_dir,
    load_config,
    options_table,
    parse_train_args,
    register_recipe,
    save_config,
)
from bnzoo.options import declared_options, parse_literal
from bnzoo.run_folder import (
    STATE_FORMAT,
    STATE_MEMBER,
    RunPaths,
    check_run_folder,
    discard_unstarted_run,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The default number of epochs, read from its declaration rather than restated.
DEFAULT_EPOCHS = TrainConfig().epochs


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_defaults_train_plain_cnn_small_with_batch_norm_on_fashion_mnist():
    config = parse_train_args([]).resolved()
    assert (config.model, config.normalization, config.dataset) == (
        "plain_cnn_small",
        "batch_norm",
        "fashion_mnist",
    )
    assert (config.train_split, config.val_split, config.test_split) == (
        "train[:90%]",
        "train[90%:]",
        "test",
    )
    assert config.output_dir == os.path.join(
        "runs", f"{datetime.date.today().isoformat()}-plain_cnn_small-fashion_mnist"
    )


@pytest.mark.parametrize(
    "optimizer, lr, weight_decay", [("sgd", 0.1, 5e-4), ("adam", 1e-3, 0.0), ("adamw", 1e-3, 0.05)]
)
def test_learning_rate_and_weight_decay_default_per_optimizer(optimizer, lr, weight_decay):
    config = parse_train_args(["--optimizer", optimizer])
    assert (config.lr, config.weight_decay) == (None, None)  # derived where they are used
    assert (config.resolved().lr, config.resolved().weight_decay) == (lr, weight_decay)
    explicit = parse_train_args(["--optimizer", optimizer, "--lr", "0.5", "--weight-decay", "0"])
    assert (explicit.resolved().lr, explicit.resolved().weight_decay) == (0.5, 0.0)


def test_command_line_flags_override_the_config_file(tmp_path):
    path = write_yaml(
        tmp_path / "run.yaml",
        {"batch_size": 64, "lr": 0.05, "model_args": {"widths": [8, 16]}, "augment": True},
    )
    config = parse_train_args(
        ["--config", path, "--lr", "0.2", "--model-arg", "depth=1", "--no-augment"]
    )
    assert config.batch_size == 64  # from the file
    assert config.lr == 0.2  # the flag wins
    assert config.model_args == {"widths": [8, 16], "depth": 1}  # merged per key
    assert config.augment is False


def test_config_file_accepts_dashed_keys_and_null(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"val-split": None, "image-size": [32, 48]})
    config = parse_train_args(["--config", path])
    assert config.val_split is None
    assert config.image_size == (32, 48)
    square = write_yaml(tmp_path / "square.yaml", {"image_size": 32, "lr": "1e-3", "epochs": 2})
    config = parse_train_args(["--config", square])
    assert (config.image_size, config.lr, config.epochs) == ((32, 32), 1e-3, 2)


def test_config_file_values_are_checked_like_flags(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"batch_size": 0})
    with pytest.raises(
        UsageError, match=r"run.yaml: batch_size must be a positive integer .*, got 0"
    ):
        parse_train_args(["--config", path])


def test_config_file_rejects_an_unknown_key_naming_close_matches(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"batch_sise": 64})
    with pytest.raises(UsageError, match="unknown option 'batch_sise'; did you mean 'batch_size'"):
        parse_train_args(["--config", path])


def test_missing_config_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        parse_train_args(["--config", str(tmp_path / "nope.yaml")])


def test_config_file_that_is_not_a_mapping_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_train_args(["--config", str(path)])


@pytest.mark.parametrize(
    "text, value",
    [
        ("0.5", 0.5),
        ("1e-3", 0.001),
        ("[32, 64]", [32, 64]),
        ("(3, 3)", (3, 3)),
        ("true", True),
        ("null", None),
        ("relu", "relu"),
        ("'max'", "max"),
    ],
)
def test_model_arg_values_are_python_or_yaml_literals(text, value):
    assert parse_literal(text) == value


def test_model_arg_needs_key_equals_value():
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        parse_train_args(["--model-arg", "widths"])


@pytest.mark.parametrize("key", ["input_shape", "classes", "normalization", "bn_momentum"])
def test_model_args_owned_by_train_py_are_refused(key):
    with pytest.raises(ValueError, match=f"--model-arg {key}=... is not allowed"):
        parse_train_args(["--model-arg", f"{key}=1"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], r"--batch-size: must be a positive integer .*, got '0'"),
        (["--epochs", "-1"], "--epochs: must be a positive integer"),
        (["--optimizer", "adagrad"], "--optimizer: invalid choice: 'adagrad'"),
        (["--lr", "0"], r"--lr: must be in \(0, 10\]"),
        (["--label-smoothing", "1.0"], r"--label-smoothing: must be in \[0, 1\)"),
        (["--warmup-epochs", "5", "--epochs", "3"], "--warmup-epochs must be"),
        (["--image-size", "0"], "--image-size: expected SIZE or HEIGHT,WIDTH"),
        (["--bn-epsilon", "0"], r"--bn-epsilon: must be in \(0, 1\]"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_values_are_usage_errors_naming_the_flag(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_train_args(argv)


def test_image_size_accepts_square_and_height_width():
    assert parse_train_args(["--image-size", "32"]).image_size == (32, 32)
    assert parse_train_args(["--image-size", "32x48"]).image_size == (32, 48)
    assert parse_train_args(["--image-size", "none"]).image_size is None


def test_saved_config_repeats_the_run(tmp_path):
    """The resolved config.yaml, fed back through --config, is the same run."""
    original = parse_train_args(
        [
            "--model-arg",
            "widths=[8,16]",
            "--image-size",
            "32,32",
            "--val-split",
            "none",
            "--epochs",
            "3",
            "--mixed-precision",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    os.makedirs(original.output_dir)
    path = save_config(original, original.output_dir)
    assert load_config(original.output_dir) == original.resolved()
    assert parse_train_args(["--config", path]) == original


def test_saved_config_never_says_overwrite_or_resume_from(tmp_path):
    save_config(TrainConfig(overwrite=True, resume_from="best"), tmp_path)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for section in (saved, saved["resolved"]):
        assert "overwrite" not in section and "resume_from" not in section
    assert load_config(tmp_path).overwrite is False


def test_default_output_dir_names_date_model_and_dataset():
    config = TrainConfig(model="bn_inception", dataset="image_folder:/data/My Flowers/")
    assert default_output_dir(config, today=datetime.date(2025, 3, 1)) == os.path.join(
        "runs", "2025-03-01-bn_inception-image_folder-My-Flowers"
    )


def test_missing_or_empty_run_folder_starts_a_new_run(tmp_path):
    config = TrainConfig()
    assert check_run_folder(tmp_path / "absent", config) == "new"
    assert check_run_folder(tmp_path, config) == "new"


def test_run_folder_holding_the_same_run_resumes(tmp_path):
    config = TrainConfig(epochs=3, output_dir=str(tmp_path))
    save_config(config, tmp_path)
    # Where the data lives is not part of the run's identity.
    moved = TrainConfig(epochs=3, output_dir=str(tmp_path), data_dir="/elsewhere")
    assert check_run_folder(tmp_path, moved) == "resume"


def training_state(epochs):
    history = [{"epoch": epoch, "loss": 1.0 / epoch} for epoch in range(1, epochs + 1)]
    return {"format": STATE_FORMAT, "epoch": epochs, "history": history, "best": None}


def commit_epochs(run_dir, epochs, which="last", state=None):
    """A checkpoints/<which>.keras that says `epochs` epochs are committed (only its training
    state: check_run_folder reads nothing else)."""
    path = RunPaths(str(run_dir)).checkpoint(which)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            STATE_MEMBER, json.dumps(training_state(epochs) if state is None else state)
        )


def test_run_folder_holding_a_different_run_is_refused_unless_overwrite(tmp_path):
    save_config(TrainConfig(epochs=3, lr=0.1), tmp_path)
    commit_epochs(tmp_path, 1)
    different = TrainConfig(epochs=3, lr=0.2)
    with pytest.raises(ValueError, match=r"holds a different run \(lr: 0.1 -> 0.2\).*--overwrite"):
        check_run_folder(tmp_path, different)
    different.overwrite = True
    assert check_run_folder(tmp_path, different) == "new"


def test_a_different_run_that_never_finished_an_epoch_is_replaced_saying_so(tmp_path, logged_lines):
    save_config(TrainConfig(lr=0.1), tmp_path)
    assert check_run_folder(tmp_path, TrainConfig(lr=0.2)) == "new"
    assert logged_lines() == [
        f"replacing {tmp_path}: it holds a different run (lr: 0.1 -> 0.2) that never "
        "finished an epoch"
    ]


def test_raising_epochs_extends_the_run_and_lowering_them_below_the_trained_is_refused(
    tmp_path,
):
    save_config(TrainConfig(epochs=3), tmp_path)
    commit_epochs(tmp_path, 3)
    assert check_run_folder(tmp_path, TrainConfig(epochs=4)) == "resume"
    assert check_run_folder(tmp_path, TrainConfig(epochs=3)) == "resume"
    with pytest.raises(ValueError, match="already trained 3 epochs, more than --epochs 2"):
        check_run_folder(tmp_path, TrainConfig(epochs=2))


def test_a_run_that_never_committed_an_epoch_is_discarded_but_a_committed_one_is_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_config(TrainConfig(), run)
    (run / ".lock").write_text("")
    assert discard_unstarted_run(RunPaths(str(run)), remove_folder=True)
    assert not run.exists()
    run.mkdir()
    (run / "mine.txt").write_text("the user's")
    save_config(TrainConfig(), run)
    assert discard_unstarted_run(RunPaths(str(run)), remove_folder=True)
    assert os.listdir(run) == ["mine.txt"]  # only the run's own files go
    save_config(TrainConfig(), run)
    commit_epochs(run, 1)
    assert not discard_unstarted_run(RunPaths(str(run)), remove_folder=True)
    assert (run / "config.yaml").exists()


def test_folder_holding_only_a_lock_file_is_a_run_killed_at_birth(tmp_path):
    (tmp_path / ".lock").write_text("")
    assert check_run_folder(tmp_path, TrainConfig()) == "new"


def test_non_empty_folder_without_a_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no bnzoo run"):
        check_run_folder(tmp_path, TrainConfig())


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_run_folder(path, TrainConfig())


def test_unknown_key_in_a_run_config_is_an_error(tmp_path):
    (tmp_path / "config.yaml").write_text("model: plain_cnn\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="config.yaml: unknown option 'learning_rate'"):
        load_config(tmp_path)


def test_image_folders_default_to_the_stratified_80_10_10_slices(tmp_path):
    config = parse_train_args(["--dataset", f"image_folder:{tmp_path}"]).resolved()
    assert (config.train_split, config.val_split, config.test_split) == (
        "train[:80%]",
        "train[80%:90%]",
        "train[90%:]",
    )
    explicit = parse_train_args(
        ["--dataset", f"image_folder:{tmp_path}", "--val-split", "none", "--test-split", "auto"]
    ).resolved()
    assert (explicit.val_split, explicit.test_split) == (None, "train[90%:]")


def test_an_image_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(dataset="image_folder:flowers").dataset == f"image_folder:{tmp_path}/flowers"


def test_bn_momentum_has_a_spelling_for_the_cumulative_average():
    assert parse_train_args(["--bn-momentum", "cumulative"]).bn_momentum == "cumulative"
    assert parse_train_args(["--bn-momentum", "none"]).bn_momentum is None
    with pytest.raises(UsageError, match="got 'sometimes'"):
        TrainConfig(bn_momentum="sometimes").validate()


def test_settings_that_have_no_effect_are_warned_about_unless_they_are_the_defaults():
    assert TrainConfig(optimizer="adam").ignored_settings() == []
    assert TrainConfig(optimizer="adam", momentum=0.5, lr_decay_rate=0.5).ignored_settings() == [
        "--momentum 0.5 has no effect with --optimizer adam (it is SGD's momentum)",
        "--lr-decay-rate 0.5 has no effect with --lr-schedule cosine (it is the exponential "
        "schedule's factor per epoch)",
    ]


def test_the_training_loops_settings_that_have_no_effect_are_warned_about():
    assert TrainConfig(distribute="auto", collective_timeout=30.0).ignored_settings() == []
    assert TrainConfig(bn_statistics="moving", bn_statistics_batches=10).ignored_settings() == [
        "--bn-statistics-batches 10 has no effect with --bn-statistics moving (it sizes the "
        "population statistics)"
    ]
    assert TrainConfig(normalization="none", bn_statistics="moving").ignored_settings() == [
        "--bn-statistics moving has no effect with --normalization none (there is no BN layer)"
    ]
    assert TrainConfig(distribute="none", collective_timeout=30.0).ignored_settings() == [
        "--collective-timeout 30 has no effect with --distribute none (it bounds "
        "multi_worker's collectives)"
    ]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": float("inf")}, r"--lr must be a finite number in \(0, 10\], got inf"),
        ({"epochs": 2.0}, "--epochs must be a positive integer"),
        ({"seed": True}, r"--seed must be an integer in \[0, 4294967295\], got True"),
        ({"image_size": (32.5, 32)}, "--image-size must be one or two positive integers"),
        ({"val_split": ""}, "--val-split must not be empty, got ''; use none for no split"),
        ({"model": ""}, "--model must not be empty"),
        ({"bn_statistics_batches": 0}, "--bn-statistics-batches must be a positive integer"),
        ({"collective_timeout": float("inf")}, "--collective-timeout must be a finite number"),
        ({"collective_timeout": -1.0}, r"--collective-timeout must be in \(0, 2592000\]"),
        ({"distribute": "multi-worker"}, "--distribute must be one of .* 'multi_worker'"),
        ({"bn_statistics": "populaton"}, "did you mean 'population'"),
        ({"sync_bn": "yes"}, "--sync-bn is a switch: true or false, got 'yes'"),
        ({"sync_bn": True, "normalization": "none"}, "--sync-bn has no effect"),
    ],
)
def test_python_configs_are_checked_like_the_command_line(values, message):
    with pytest.raises(UsageError, match=message):
        TrainConfig(**values).validate()


def test_a_run_folder_that_cannot_be_created_is_refused_before_the_run(tmp_path):
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(ValueError, match=r"notes.txt is a file, not a folder"):
        check_run_folder(tmp_path / "notes.txt" / "runs" / "x", TrainConfig())


# --- Each option declared once; derived values never saved as chosen ---------------------------


def test_rerunning_a_saved_default_config_with_adam_derives_adams_rate_and_decay(tmp_path):
    """The issue's reproduction: the saved config recorded SGD's lr 0.1 and decay 5e-4 as if the
    user had chosen them, so `--optimizer adam` trained Adam at SGD's values."""
    path = save_config(parse_train_args([]), tmp_path)
    rerun = parse_train_args(["--config", path, "--optimizer", "adam"]).resolved()
    fresh = parse_train_args(["--optimizer", "adam"]).resolved()
    assert (rerun.lr, rerun.weight_decay) == (fresh.lr, fresh.weight_decay) == (1e-3, 0.0)


@pytest.mark.parametrize(
    "optimizer, option, expected",
    [
        ("adam", "lr", 1e-3),
        ("adamw", "lr", 1e-3),
        ("adam", "weight_decay", 0.0),
        ("adamw", "weight_decay", 0.05),
    ],
)
def test_the_optimizers_defaults_are_derived_afresh_through_config(
    optimizer, option, expected, tmp_path
):
    path = save_config(parse_train_args(["--output-dir", str(tmp_path)]), tmp_path)
    assert getattr(load_config(tmp_path), option) == {"lr": 0.1, "weight_decay": 5e-4}[option]
    rerun = parse_train_args(["--config", path, "--optimizer", optimizer]).resolved()
    assert getattr(rerun, option) == expected


def test_the_datasets_splits_are_derived_afresh_through_config(tmp_path):
    path = save_config(parse_train_args(["--output-dir", str(tmp_path)]), tmp_path)
    assert load_config(tmp_path).train_split == "train[:90%]"
    folder = tmp_path / "flowers"
    rerun = parse_train_args(["--config", path, "--dataset", f"image_folder:{folder}"]).resolved()
    assert (rerun.train_split, rerun.val_split, rerun.test_split) == (
        "train[:80%]",
        "train[80%:90%]",
        "train[90%:]",
    )


def test_a_chosen_value_of_a_derived_option_stays_chosen(tmp_path):
    path = save_config(parse_train_args(["--lr", "0.5", "--output-dir", str(tmp_path)]), tmp_path)
    rerun = parse_train_args(["--config", path, "--optimizer", "adam"]).resolved()
    assert (rerun.lr, rerun.weight_decay) == (0.5, 0.0)


def test_config_yaml_keeps_the_chosen_options_apart_from_the_resolved_values(tmp_path):
    config = parse_train_args(["--epochs", "3", "--output-dir", str(tmp_path)])
    saved = yaml.safe_load(open(save_config(config, tmp_path)).read())
    resolved = saved.pop("resolved")
    assert saved == {"epochs": 3, "output_dir": str(tmp_path)}
    assert (resolved["epochs"], resolved["lr"], resolved["weight_decay"]) == (3, 0.1, 5e-4)
    assert resolved["train_split"] == "train[:90%]"
    # Every saved option is recorded, and none that is an action on the folder.
    saved_options = {
        field.name for field, declared in declared_options(TrainConfig) if declared.saved
    }
    assert set(resolved) == saved_options


def test_a_resumed_run_keeps_the_options_chosen_when_it_started(tmp_path):
    save_config(TrainConfig(lr=0.1, epochs=3, seed=1, output_dir=str(tmp_path)), tmp_path)
    save_config(TrainConfig(epochs=5, seed=1, output_dir=str(tmp_path)), tmp_path, resumed=True)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert (saved["lr"], saved["epochs"], saved["seed"]) == (0.1, 5, 1)
    # Resumed without --epochs, the run trains the default: 3 is no longer its choice.
    save_config(TrainConfig(output_dir=str(tmp_path)), tmp_path, resumed=True)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "epochs" not in saved and saved["lr"] == 0.1
    assert saved["resolved"]["epochs"] == DEFAULT_EPOCHS


def test_the_identity_check_compares_resolved_values(tmp_path):
    """A run's folder holds SGD at lr 0.1; the same config rerun with --optimizer adam derives
    Adam's rate and decay, so it is a different run, named by every value that differs."""
    path = save_config(parse_train_args(["--output-dir", str(tmp_path)]), tmp_path)
    commit_epochs(tmp_path, 1)
    assert check_run_folder(tmp_path, parse_train_args(["--config", path])) == "resume"
    with pytest.raises(ValueError, match="holds a different run") as raised:
        check_run_folder(tmp_path, parse_train_args(["--config", path, "--optimizer", "adam"]))
    assert "lr: 0.1 -> 0.001; optimizer: 'sgd' -> 'adam'; weight_decay: 0.0005 -> 0.0" in str(
        raised.value
    )
    # Choosing the derived values explicitly is the same run.
    assert check_run_folder(tmp_path, TrainConfig(lr=0.1, weight_decay=5e-4)) == "resume"


def test_a_config_written_before_resolved_was_kept_apart_still_loads(tmp_path):
    (tmp_path / "config.yaml").write_text(
        "# bnzoo training run: the resolved configuration.\nmodel: plain_cnn\nlr: 0.1\n"
        "train_split: train[:90%]\nepochs: 3\n"
    )
    assert (load_config(tmp_path).lr, load_config(tmp_path).epochs) == (0.1, 3)


def test_the_parser_has_one_flag_per_declared_option():
    parser = build_train_parser()
    destinations = {action.dest for action in parser._actions if action.option_strings}
    declared = {field.name for field, _ in declared_options(TrainConfig)}
    assert destinations == declared | {"help", "config", "debug"}


def test_the_options_table_in_the_docs_is_generated_from_the_declarations():
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as stream:
        assert options_table() in stream.read()


# --- Recipes -----------------------------------------------------------------------------------


@pytest.fixture
def recipe(monkeypatch):
    """A registered recipe, removed again after the test."""
    monkeypatch.setattr(config_module, "RECIPES", {})
    return register_recipe(
        "test_recipe",
        "a bundle for the tests",
        epochs=7,
        batch_size=32,
        lr=0.3,
        label_smoothing=0.1,
    )


def test_values_layer_as_default_then_recipe_then_config_file_then_command_line(recipe, tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"batch_size": 64, "lr": 0.2, "recipe": recipe.name})
    config = parse_train_args(["--config", path, "--lr", "0.25"])
    assert config.momentum == 0.9  # the default
    assert (config.epochs, config.label_smoothing) == (7, 0.1)  # the recipe
    assert config.batch_size == 64  # the config file over the recipe
    assert config.lr == 0.25  # the command line over all
    assert parse_train_args(["--recipe", recipe.name, "--epochs", "10"]).epochs == 10


def test_a_recipe_is_saved_by_name_and_dropping_it_drops_its_values(recipe, tmp_path):
    config = parse_train_args(["--recipe", recipe.name, "--output-dir", str(tmp_path)])
    saved = yaml.safe_load(open(save_config(config, tmp_path)).read())
    assert saved["recipe"] == recipe.name and "epochs" not in saved  # not chosen: the recipe's
    assert saved["resolved"]["epochs"] == 7
    rerun = parse_train_args(["--config", str(tmp_path / "config.yaml"), "--recipe", "none"])
    assert (rerun.recipe, rerun.epochs, rerun.resolved().lr) == (None, DEFAULT_EPOCHS, 0.1)


def test_a_python_config_layers_a_recipe_under_its_keywords(recipe):
    config = TrainConfig(recipe=recipe.name, batch_size=16)
    assert (config.epochs, config.batch_size) == (7, 16)
    assert config.chosen() == {"recipe": recipe.name, "batch_size": 16}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epoch": 3}, "unknown option 'epoch'; did you mean 'epochs'"),
        ({"output_dir": "runs/x"}, "output_dir is not something a recipe may set"),
        ({"distribute": "none"}, "distribute is not something a recipe may set"),
        ({"lr": 0}, r"lr must be in \(0, 10\], got 0"),
    ],
)
def test_a_recipe_is_checked_when_it_is_registered(values, message, monkeypatch):
    monkeypatch.setattr(config_module, "RECIPES", {})
    with pytest.raises(ValueError, match=message):
        register_recipe("bad", "a bad bundle", **values)


def test_an_unknown_recipe_is_a_usage_error(recipe):
    with pytest.raises(UsageError, match="argument --recipe: must be one of test_recipe, got 'x'"):
        parse_train_args(["--recipe", "x"])


# --- Files from elsewhere ----------------------------------------------------------------------

BILLION_LAUGHS = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def test_a_yaml_alias_bomb_in_config_is_refused_at_once(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(BILLION_LAUGHS)
    with pytest.raises(UsageError, match=r"line 2: an alias \(\*a\) repeats a value by reference"):
        parse_train_args(["--config", str(path)])


def run_config(tmp_path, text):
    (tmp_path / "config.yaml").write_text(config_module.CONFIG_HEADER + "\n" + text)
    return tmp_path


@pytest.mark.parametrize(
    "text, message",
    [
        (BILLION_LAUGHS, r"config.yaml: line 3: an alias \(\*a\)"),
        ("1: plain_cnn\n", "config.yaml: 1 is not an option name"),
        ("model_args: 5\n", r"config.yaml: model_args must be a mapping such as \{widths"),
        ("batch_size: lots\n", r"config.yaml: batch_size must be a positive integer .*'lots'"),
        ("resolved: {batch_size: lots}\n", r"config.yaml \(resolved\): batch_size must be"),
        ("resolved: [1]\n", "config.yaml: resolved must be a mapping"),
        ("resolved: {epochs: 2, warmup_epochs: 3}\n", "config.yaml: --warmup-epochs must be less"),
    ],
)
def test_a_tampered_run_config_is_refused_before_any_work_naming_the_file_and_key(
    text, message, tmp_path
):
    run = run_config(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        check_run_folder(run, TrainConfig())


def test_a_config_file_over_a_megabyte_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# " + "x" * 1024 * 1024 + "\n")
    with pytest.raises(UsageError, match="too large for a config file"):
        parse_train_args(["--config", str(path)])


def test_a_path_with_a_newline_injects_no_yaml_key_and_the_repeat_command_is_valid_shell(
    tmp_path,
):
    run = tmp_path / "run\nevil: 1\n# it's"
    run.mkdir()
    path = save_config(TrainConfig(output_dir=str(run)), run)
    text = open(path).read()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert len(comments) == 2 and "evil" not in yaml.safe_load(text)
    assert load_config(run).output_dir == str(run)
    command = comments[1].split("with: ", 1)[1]
    assert command.startswith("python train.py --config ")
    argument = command[len("python train.py --config ") :]
    echoed = subprocess.run(
        ["bash", "-c", f"printf %s {argument}"], capture_output=True, text=True, check=True
    )
    assert echoed.stdout == path


# --- No user file is ever deleted or overwritten ----------------------------------------------


def users_folder(tmp_path):
    """A folder that holds no bnzoo run, but files named like a run's."""
    folder = tmp_path / "mine"
    for name in ("logs/notes.txt", "checkpoints/x.keras", "saved_model/a.pb", "metrics.json"):
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        (folder / name).write_text("the user's")
    return folder


def all_files(folder):
    return sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, files in os.walk(folder)
        for name in files
    )


def test_overwrite_never_touches_a_folder_that_holds_no_bnzoo_run(tmp_path):
    folder = users_folder(tmp_path)
    before = all_files(folder)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="holds no bnzoo run .* choose another --output-dir"):
            check_run_folder(folder, TrainConfig(overwrite=overwrite))
    # A config.yaml that train.py did not write is not a run either.
    (folder / "config.yaml").write_text("epochs: 3\n")
    with pytest.raises(ValueError, match="holds no bnzoo run"):
        check_run_folder(folder, TrainConfig(overwrite=True))
    assert all_files(folder) == sorted([*before, "config.yaml"])


@pytest.mark.parametrize("result", ["history.csv", "model.keras", "metrics.json"])
def test_a_run_with_results_but_no_checkpoint_is_never_replaced_without_overwrite(result, tmp_path):
    """A finished run whose checkpoints/ was removed: rerun with one option changed, or as it
    was, it is refused (it can no longer resume) instead of being replaced."""
    save_config(TrainConfig(lr=0.1), tmp_path)
    (tmp_path / result).write_text("epoch,loss\n1,0.5\n" if result == "history.csv" else "{}")
    with pytest.raises(ValueError, match=r"holds a different run \(lr: 0.1 -> 0.2\)"):
        check_run_folder(tmp_path, TrainConfig(lr=0.2))
    with pytest.raises(
        ValueError, match=f"holds this run's results \\({result}\\) but no checkpoint"
    ):
        check_run_folder(tmp_path, TrainConfig(lr=0.1))
    assert check_run_folder(tmp_path, TrainConfig(lr=0.2, overwrite=True)) == "new"
    assert not discard_unstarted_run(RunPaths(str(tmp_path)), remove_folder=True)
    assert (tmp_path / result).exists()


def test_a_damaged_last_checkpoint_refuses_to_resume_and_offers_best(tmp_path):
    save_config(TrainConfig(epochs=4), tmp_path)
    commit_epochs(tmp_path, 2, which="best")
    commit_epochs(tmp_path, 3, state=[3])  # tampered: a list
    with pytest.raises(ValueError) as raised:
        check_run_folder(tmp_path, TrainConfig(epochs=4))
    assert "must be a JSON object, got a list" in str(raised.value)
    assert "best.keras is intact (epoch 2): rerun with --resume-from best" in str(raised.value)
    assert check_run_folder(tmp_path, TrainConfig(epochs=4, resume_from="best")) == "resume"


def test_resume_from_best_needs_a_run_to_resume(tmp_path):
    for config in (
        TrainConfig(resume_from="best"),
        TrainConfig(resume_from="best", overwrite=True),
    ):
        with pytest.raises(ValueError, match="--resume-from best: .* holds no run"):
            check_run_folder(tmp_path / "absent", config)
    save_config(TrainConfig(), tmp_path)
    with pytest.raises(ValueError, match="--resume-from best: .* has no .*best.keras to resume"):
        check_run_folder(tmp_path, TrainConfig(resume_from="best"))
