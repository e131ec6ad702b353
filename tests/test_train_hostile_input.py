"""train.py and evaluate.py given hostile command lines and config files: each mistake is one
line on stderr and exit status 2 (a bad command line), answered before TensorFlow is imported,
with no run folder left behind.

Argument errors never import TensorFlow, so they are checked in process: the scripts' `main`
under `bnzoo.cli.run_cli`, exactly what `python train.py` runs, with the TensorFlow import made
to fail. A few cases run the real script in a subprocess for the process's exit contract.
"""

import importlib.util
import os

import pytest
import yaml

from bnzoo.cli import EXIT_USAGE, EXIT_USER_ERROR, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name[: -len(".py")], os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def run_in_process(monkeypatch, capsys):
    """`run(script, *argv)` runs the script's `main` as `python script` does and returns (exit
    status, the stderr lines, stdout); importing TensorFlow fails the test."""

    def forbidden():
        raise AssertionError("the argument error came after TensorFlow was imported")

    def run(script, *argv):
        module = load_script(script)
        monkeypatch.setattr(module, "import_tensorflow_quietly", forbidden)
        status = run_cli(module.main, [str(arg) for arg in argv], prog=script)
        captured = capsys.readouterr()
        return status, captured.err.splitlines(), captured.out

    return run


def one_error_line(result, status, script="train.py"):
    code, lines, _ = result
    assert code == status, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    return lines[0]


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
def test_bad_flags_exit_2_in_one_line_naming_the_flag(
    argv, message, tmp_path, monkeypatch, run_in_process
):
    monkeypatch.chdir(tmp_path)
    result = run_in_process("train.py", *argv, "--output-dir", tmp_path / "run")
    assert message in one_error_line(result, EXIT_USAGE)
    assert result[2] == ""
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
        ("lr: .inf\n", "run.yaml: lr must be a finite number in (0, 10], got inf"),
        ("image_size: [32, 32, 3]\n", "image_size expected SIZE or HEIGHT,WIDTH"),
        ("output_dir: ''\n", "output_dir must not be empty (use none for the default)"),
        ("- a list\n", "expected a mapping of option: value"),
        ("bogus: 1\n", "unknown option 'bogus'"),
        ("dataset: null\n", "dataset needs a value, got null"),
        ("train_split: ~\n", "train_split needs a value, got null"),
        ("model_args: {widths: " + "[" * 5000 + "}\n", "nested too deeply"),
        ("lr: \xff\n", "not a text (UTF-8) file"),
        ("bn_statistics_batches: 0\n", "bn_statistics_batches must be a positive integer"),
        ("collective_timeout: .inf\n", "collective_timeout must be a finite number"),
        ("collective_timeout: null\n", "collective_timeout needs a value, got null"),
        ("sync_bn: 'yes'\n", "sync_bn must be true or false, got 'yes'"),
        ("mixed_precision: 'no'\n", "mixed_precision must be true, false or null, got 'no'"),
        ("distribute: null\n", "distribute needs a value, got null"),
        ("a: &a [1, 1]\nb: [*a, *a]\n", "line 2: an alias (*a) repeats a value by reference"),
        ("1: 2\n", "run.yaml: 1 is not an option name"),
        ("model_args: 5\n", "model_args must be a mapping such as {widths: [32, 64]}, got 5"),
        (
            "batch_size: lots\n",
            "batch_size must be a positive integer (at most 1048576), got 'lots'",
        ),
        ("recipe: nope\n", "recipe must be one of"),
        ("resolved: {lr: 0}\n", "run.yaml (resolved): lr must be in (0, 10], got 0"),
    ],
)
def test_bad_config_files_exit_2_in_one_line(text, message, tmp_path, monkeypatch, run_in_process):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "run.yaml"
    path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    result = run_in_process("train.py", "--config", path, "--output-dir", tmp_path / "run")
    assert message in one_error_line(result, EXIT_USAGE)
    assert os.listdir(tmp_path) == ["run.yaml"]


@pytest.mark.parametrize(
    "argv, files, message",
    [
        (["--lr", "inf"], {}, "argument --lr: must be a finite number in (0, 10], got 'inf'"),
        (["--config", "run.yaml"], {"run.yaml": "lr: [0.1]\n"}, "lr must be a single value"),
        (["--freeze-backbone"], {}, "--freeze-backbone needs --weights"),
    ],
)
def test_the_script_exits_2_with_one_line_and_leaves_nothing(
    argv, files, message, tmp_path, run_script
):
    """The process's contract, on the real script: status 2, one stderr line, no traceback,
    nothing on stdout, no run folder."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = run_script.run("train.py", *argv, "--output-dir", tmp_path / "run", cwd=tmp_path)
    assert message in run_script.error_line(result, EXIT_USAGE)
    assert result.stdout == ""
    assert sorted(os.listdir(tmp_path)) == sorted(files)


def test_a_missing_config_file_is_a_run_time_error_exit_1(tmp_path, run_in_process):
    result = run_in_process("train.py", "--config", tmp_path / "nope.yaml")
    assert "nope.yaml: no such file" in one_error_line(result, EXIT_USER_ERROR)


def test_a_config_that_is_not_a_regular_file_is_refused_without_reading_it(run_in_process):
    result = run_in_process("train.py", "--config", "/dev/zero")
    assert "--config /dev/zero: not a regular file" in one_error_line(result, EXIT_USER_ERROR)


def test_a_run_folder_given_as_config_points_at_its_config_yaml(tmp_path, run_in_process):
    (tmp_path / "config.yaml").write_text("epochs: 1\n")
    line = one_error_line(run_in_process("train.py", "--config", tmp_path), EXIT_USER_ERROR)
    assert line.endswith(f"is a folder, not a file; did you mean --config {tmp_path}/config.yaml?")


def test_evaluate_output_into_a_missing_folder_fails_before_evaluating(tmp_path, run_in_process):
    """The model path does not even exist: the --output check comes first, before TensorFlow."""
    result = run_in_process(
        "evaluate.py", tmp_path / "no-model", "--output", tmp_path / "missing" / "m.json"
    )
    line = one_error_line(result, EXIT_USER_ERROR, "evaluate.py")
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
    argv, message, tmp_path, run_in_process
):
    """The model path does not even exist: the options are wrong by themselves (exit 2)."""
    result = run_in_process("evaluate.py", tmp_path / "no-model", *argv)
    assert message in one_error_line(result, EXIT_USAGE, "evaluate.py")


def test_a_run_config_repeats_the_run_in_its_own_folder_from_any_directory(tmp_path, monkeypatch):
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
    monkeypatch.chdir(elsewhere)
    config = parse_train_args(["--config", "../archive/first/config.yaml"])
    assert os.path.samefile(config.output_dir, moved)
    # An explicit --output-dir still wins: repeat the run in a new folder.
    again = parse_train_args(["--config", str(moved / "config.yaml"), "--output-dir", "new"])
    assert again.output_dir == "new"


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "bnzoo.json: the description must be a JSON object, got [1, 2]"),
        ('{"class_names": "abc"}', "bnzoo.json: class_names must be a list of strings"),
        ('{"preprocessing": {"mean": [0.5], "std": [0]}}', "preprocessing must be a mapping whose"),
        ('{"input": {"shape": [1, 2]}}', "bnzoo.json: input must be {shape: [null, height,"),
        ("{", "bnzoo.json: not a JSON description of the export"),
    ],
)
def test_a_damaged_export_description_is_one_line_naming_the_file(
    content, message, tmp_path, capsys
):
    """`python -m bnzoo.export RUN` reads the run's saved_model/assets.extra/bnzoo.json before
    TensorFlow: a file from elsewhere is refused in one line, not a traceback."""
    from bnzoo.config import TrainConfig, save_config
    from bnzoo.export.__main__ import main

    save_config(TrainConfig(output_dir=str(tmp_path)), tmp_path)
    (tmp_path / "model.keras").write_bytes(b"")
    description = tmp_path / "saved_model" / "assets.extra" / "bnzoo.json"
    description.parent.mkdir(parents=True)
    description.write_text(content)
    assert run_cli(main, [str(tmp_path)], prog="python -m bnzoo.export") == EXIT_USER_ERROR
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_overwrite_on_a_folder_holding_no_run_deletes_nothing(tmp_path, capsys):
    """The user's logs/, checkpoints/, saved_model/ and metrics.json survive `--overwrite`:
    it only ever replaces a bnzoo run's own files."""
    folder = tmp_path / "mine"
    names = ["logs/notes.txt", "checkpoints/x.keras", "saved_model/a.pb", "metrics.json"]
    for name in names:
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        (folder / name).write_text("the user's")
    argv = ["--overwrite", "--output-dir", str(folder), "--train-split", "train[:64]"]
    assert run_cli(load_script("train.py").main, argv, prog="train.py") == EXIT_USER_ERROR
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "holds no bnzoo run" in lines[0], lines
    for name in names:
        assert (folder / name).read_text() == "the user's"
