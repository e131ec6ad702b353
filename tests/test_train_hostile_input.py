"""train.py given hostile command lines and config files, in a real process: each mistake is
one line on stderr and exit status 2 (a bad command line), answered before TensorFlow is
imported, with no run folder left behind."""

import os

import pytest
import yaml

from bnzoo.cli import EXIT_USAGE, EXIT_USER_ERROR


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "inf"], "argument --lr: must be a finite number in (0, 10], got 'inf'"),
        (["--lr", "nan"], "argument --lr: must be a finite number"),
        (["--lr", "1e308"], "argument --lr: must be in (0, 10] and representable in float32"),
        (["--lr", "1e-300"], "representable in float32"),
        (["--lr", "0"], "argument --lr: must be in (0, 10], got '0'"),
        (["--momentum", "2"], "argument --momentum: must be in [0, 1), got '2'"),
        (["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295], got '-1'"),
        (["--seed", "1.5"], "argument --seed: must be an integer"),
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
        (["--epochs", "1e9"], "argument --epochs: must be a positive integer (at most 100000)"),
        (["--weight-decay", "-1"], "argument --weight-decay: must be in [0, 1)"),
        (["--label-smoothing", "1"], "argument --label-smoothing: must be in [0, 1)"),
        (["--lr-decay-rate", "0"], "argument --lr-decay-rate: must be in (0, 1]"),
        (["--bn-epsilon", "-1e-3"], "argument --bn-epsilon: must be in (0, 1]"),
        (["--warmup-epochs", "5", "--epochs", "3"], "--warmup-epochs must be less than --epochs"),
        (["--image-size", "32,,32"], "argument --image-size: expected SIZE or HEIGHT,WIDTH"),
        (["--image-size", "32x"], "argument --image-size: expected SIZE or HEIGHT,WIDTH"),
        (["--output-dir", ""], "argument --output-dir: must not be empty"),
        (["--val-split", ""], "argument --val-split: must not be empty (use none"),
        (["--dataset", " "], "argument --dataset: must not be empty"),
        (["--dataset", "image_folder:"], "--dataset image_folder: needs a folder"),
        (
            ["--bn-momentum", "0.5", "--normalization", "none"],
            "--bn-momentum has no effect with --normalization none",
        ),
        (
            ["--bn-epsilon", "1e-5", "--normalization", "none"],
            "--bn-epsilon has no effect with --normalization none",
        ),
        (
            ["--bn-momentum", "cumulative", "--normalization", "keras"],
            "--bn-momentum cumulative needs bnzoo's layer",
        ),
        (["--bn-momentum", "1.5"], "cumulative (the layer's cumulative average, momentum=None)"),
        (["--model-arg", "widths=[abc"], "'[abc' is not a valid literal"),
        (["--model-arg", "widths="], "widths= needs a value"),
        (["--model-arg", "name=x/y"], "--model-arg name=... is not allowed"),
        (["--model-arg", "when=2024-01-01"], "is a date; a model argument must be"),
        (["--model-arg", "widths=" + "[" * 100_000], "is not a valid literal"),
        (["--lr", "-1e-3"], "argument --lr: must be in (0, 10], got '-1e-3'"),
        (["--image-size", "32x32x3"], "argument --image-size: expected SIZE or HEIGHT,WIDTH"),
        # The training loop's flags (issue 9) follow the same rules.
        (
            ["--bn-statistics-batches", "0"],
            "argument --bn-statistics-batches: must be a positive integer",
        ),
        (["--bn-statistics-batches", "2.5"], "argument --bn-statistics-batches: must be a"),
        (
            ["--collective-timeout", "inf"],
            "argument --collective-timeout: must be a finite number in (0, 2592000], got 'inf'",
        ),
        (["--collective-timeout", "nan"], "argument --collective-timeout: must be a finite"),
        (["--collective-timeout", "0"], "argument --collective-timeout: must be in (0, 2592000]"),
        (["--collective-timeout", "-5"], "argument --collective-timeout: must be in (0, 2592000]"),
        # A timeout is a host-side float64: too large is out of range, not "not float32".
        (["--collective-timeout", "1e308"], "must be in (0, 2592000], got '1e308'"),
        (
            ["--sync-bn", "--normalization", "none"],
            "--sync-bn has no effect with --normalization none (there is no BN layer",
        ),
        (["--distribute", "multi-worker"], "argument --distribute: invalid choice"),
        (["--bn-statistics", "popular"], "argument --bn-statistics: invalid choice"),
        (["--horizontal-flip"], "--horizontal-flip/--no-horizontal-flip only has an effect with"),
        # Fine-tuning (issue 10).
        (["--freeze-backbone"], "--freeze-backbone needs --weights: a randomly initialized"),
        (["--freeze-until", "inception_4e_output"], "--freeze-until only has an effect with"),
        (["--model-arg", "weights=imagenet"], "weights=... is not allowed: use --weights"),
        (["--weights", ""], "argument --weights: must not be empty (use none"),
    ],
)
def test_bad_flags_exit_2_in_one_line_naming_the_flag(argv, message, tmp_path, run_script):
    output_dir = tmp_path / "run"
    result = run_script.run("train.py", *argv, "--output-dir", output_dir, cwd=tmp_path)
    assert message in run_script.error_line(result, EXIT_USAGE)
    assert result.stdout == ""
    assert os.listdir(tmp_path) == []  # no run folder, no runs/


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch_size: 64\nepochs: 2\nbatch_size: 32\n", "key 'batch_size' appears twice (line 3)"),
        ("batch-size: 64\nbatch_size: 32\n", "'batch-size' and 'batch_size' set the same option"),
        ("model_args: {widths: [8], widths: [4]}\n", "key 'widths' appears twice"),
        ("model_args: {widths: [abc\n", "not valid YAML"),
        ("model_args: {when: 2024-01-01}\n", "model_args when: datetime.date(2024, 1, 1) is a"),
        ("val_split: false\n", "val_split must be a value, got false (use null to turn it off)"),
        ("lr: [0.1]\n", "lr must be a single value, got [0.1]"),
        ("lr: .inf\n", "argument --lr: must be a finite number"),
        ("image_size: [32, 32, 3]\n", "argument --image-size: expected SIZE or HEIGHT,WIDTH"),
        ("output_dir: ''\n", "argument --output-dir: must not be empty"),
        ("- a list\n", "expected a mapping of option: value"),
        ("bogus: 1\n", "unknown option 'bogus'"),
        ("dataset: null\n", "dataset needs a value, got null"),
        ("train_split: ~\n", "train_split needs a value, got null"),
        ("model_args: {widths: " + "[" * 5000 + "}\n", "nested too deeply"),
        ("lr: \xff\n", "not a text (UTF-8) file"),
        ("bn_statistics_batches: 0\n", "argument --bn-statistics-batches: must be a positive"),
        ("collective_timeout: .inf\n", "argument --collective-timeout: must be a finite number"),
        ("collective_timeout: null\n", "collective_timeout needs a value, got null"),
        ("sync_bn: 'yes'\n", "sync_bn must be true or false, got 'yes'"),
        ("mixed_precision: 'no'\n", "mixed_precision must be true, false or null, got 'no'"),
        ("distribute: null\n", "distribute needs a value, got null"),
    ],
)
def test_bad_config_files_exit_2_in_one_line(text, message, tmp_path, run_script):
    path = tmp_path / "run.yaml"
    path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    result = run_script.run(
        "train.py", "--config", path, "--output-dir", tmp_path / "run", cwd=tmp_path
    )
    assert message in run_script.error_line(result, EXIT_USAGE)
    assert os.listdir(tmp_path) == ["run.yaml"]


def test_a_missing_config_file_is_a_run_time_error_exit_1(tmp_path, run_script):
    result = run_script.run("train.py", "--config", tmp_path / "nope.yaml", cwd=tmp_path)
    assert "nope.yaml: no such file" in run_script.error_line(result, EXIT_USER_ERROR)


def test_a_run_folder_given_as_config_points_at_its_config_yaml(tmp_path, run_script):
    (tmp_path / "config.yaml").write_text("epochs: 1\n")
    result = run_script.run("train.py", "--config", tmp_path, cwd=tmp_path)
    line = run_script.error_line(result, EXIT_USER_ERROR)
    assert line.endswith(f"is a folder, not a file; did you mean --config {tmp_path}/config.yaml?")


def test_evaluate_output_into_a_missing_folder_fails_before_evaluating(tmp_path, run_script):
    """The model path does not even exist: the --output check comes first, before TensorFlow."""
    result = run_script.run(
        "evaluate.py", tmp_path / "no-model", "--output", tmp_path / "missing" / "m.json"
    )
    line = run_script.error_line(result, EXIT_USER_ERROR, "evaluate.py")
    assert f"--output {tmp_path / 'missing' / 'm.json'}: folder" in line
    assert "does not exist; create it first" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bn-statistics-split", ""], "argument --bn-statistics-split: must not be empty"),
        (["--bn-statistics-batches", "5"], "--bn-statistics-batches has no effect without"),
        (["--bn-statistics-batch-size", "8"], "--bn-statistics-batch-size has no effect without"),
        (["--bn-statistics-batches", "0"], "argument --bn-statistics-batches: must be a positive"),
    ],
)
def test_evaluate_statistics_options_are_checked_before_anything_is_read(
    argv, message, tmp_path, run_script
):
    """The model path does not even exist: the options are wrong by themselves (exit 2)."""
    result = run_script.run("evaluate.py", tmp_path / "no-model", *argv)
    assert message in run_script.error_line(result, EXIT_USAGE, "evaluate.py")


def test_a_run_config_repeats_the_run_in_its_own_folder_from_any_directory(tmp_path):
    """config.yaml names its run folder by where it is, not by the working directory it was
    written from: `--config <run>/config.yaml` resumes that run from anywhere, even moved."""
    from bnzoo.config import TrainConfig, parse_train_args, save_config

    run = tmp_path / "runs" / "first"
    run.mkdir(parents=True)
    save_config(TrainConfig(output_dir="runs/first", data_dir="data"), run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert os.path.isabs(saved["output_dir"]) and os.path.isabs(saved["data_dir"])
    moved = tmp_path / "archive" / "first"
    os.renames(run, moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    try:
        config = parse_train_args(["--config", "../archive/first/config.yaml"])
        assert os.path.samefile(config.output_dir, moved)
        # An explicit --output-dir still wins: repeat the run in a new folder.
        again = parse_train_args(["--config", str(moved / "config.yaml"), "--output-dir", "new"])
        assert again.output_dir == "new"
    finally:
        os.chdir(tmp_path)
