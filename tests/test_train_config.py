"""train.py's configuration: flags, `--config run.yaml`, the saved config and the run folder's
identity. No TensorFlow needed: these run in milliseconds."""

import datetime
import json
import os
import zipfile

import pytest
import yaml

from bnzoo.cli import UsageError
from bnzoo.config import (
    TrainConfig,
    default_output_dir,
    load_config,
    parse_literal,
    parse_train_args,
    save_config,
)
from bnzoo.run_folder import (
    STATE_FORMAT,
    STATE_MEMBER,
    RunPaths,
    check_run_folder,
    discard_unstarted_run,
)


def write_yaml(path, values):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_defaults_train_plain_cnn_with_batch_norm_on_fashion_mnist():
    config = parse_train_args([])
    assert (config.model, config.normalization, config.dataset) == (
        "plain_cnn",
        "batch_norm",
        "fashion_mnist",
    )
    assert (config.train_split, config.val_split, config.test_split) == (
        "train[:90%]",
        "train[90%:]",
        "test",
    )
    assert config.output_dir == os.path.join(
        "runs", f"{datetime.date.today().isoformat()}-plain_cnn-fashion_mnist"
    )


@pytest.mark.parametrize(
    "optimizer, lr, weight_decay", [("sgd", 0.1, 5e-4), ("adam", 1e-3, 0.0), ("adamw", 1e-3, 0.05)]
)
def test_learning_rate_and_weight_decay_default_per_optimizer(optimizer, lr, weight_decay):
    config = parse_train_args(["--optimizer", optimizer])
    assert (config.lr, config.weight_decay) == (lr, weight_decay)
    explicit = parse_train_args(["--optimizer", optimizer, "--lr", "0.5", "--weight-decay", "0"])
    assert (explicit.lr, explicit.weight_decay) == (0.5, 0.0)


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
    path = write_yaml(tmp_path / "run.yaml", {"val-split": None, "image-size": [32, 32]})
    config = parse_train_args(["--config", path])
    assert config.val_split is None
    assert config.image_size == (32, 32)


def test_config_file_values_are_checked_like_flags(tmp_path):
    path = write_yaml(tmp_path / "run.yaml", {"batch_size": 0})
    with pytest.raises(UsageError, match=r"--batch-size: must be a positive integer .*, got '0'"):
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
    assert load_config(original.output_dir) == original
    assert parse_train_args(["--config", path]) == original


def test_saved_config_never_says_overwrite(tmp_path):
    save_config(TrainConfig(overwrite=True), tmp_path)
    assert "overwrite" not in yaml.safe_load((tmp_path / "config.yaml").read_text())
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


def commit_epochs(run_dir, epochs):
    """A checkpoints/last.keras that says `epochs` epochs are committed (only its training
    state: check_run_folder reads nothing else)."""
    path = RunPaths(str(run_dir)).last_checkpoint
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        state = {"format": STATE_FORMAT, "epoch": epochs, "history": [], "best": None}
        archive.writestr(STATE_MEMBER, json.dumps(state))


def test_run_folder_holding_a_different_run_is_refused_unless_overwrite(tmp_path):
    save_config(TrainConfig(epochs=3, lr=0.1), tmp_path)
    commit_epochs(tmp_path, 1)
    different = TrainConfig(epochs=3, lr=0.2)
    with pytest.raises(ValueError, match=r"holds a different run \(lr: 0.1 -> 0.2\).*--overwrite"):
        check_run_folder(tmp_path, different)
    different.overwrite = True
    assert check_run_folder(tmp_path, different) == "new"


def test_a_different_run_that_never_finished_an_epoch_is_replaced_saying_so(tmp_path):
    save_config(TrainConfig(lr=0.1), tmp_path)
    lines = []
    assert check_run_folder(tmp_path, TrainConfig(lr=0.2), log=lines.append) == "new"
    assert lines == [
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
    with pytest.raises(ValueError, match="unknown key 'learning_rate'"):
        load_config(tmp_path)


def test_image_folders_default_to_the_stratified_80_10_10_slices(tmp_path):
    config = parse_train_args(["--dataset", f"image_folder:{tmp_path}"])
    assert (config.train_split, config.val_split, config.test_split) == (
        "train[:80%]",
        "train[80%:90%]",
        "train[90%:]",
    )
    explicit = parse_train_args(
        ["--dataset", f"image_folder:{tmp_path}", "--val-split", "none", "--test-split", "auto"]
    )
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
