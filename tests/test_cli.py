"""Shared CLI behaviour: user errors become one line on stderr and a non-zero exit, bugs keep
their traceback, `--debug` shows it for user errors too; bnzoo's log records are the scripts'
progress lines on stdout."""

import logging
import logging.handlers
import os
import signal
import subprocess
import sys

import pytest

from bnzoo import signals
from bnzoo.cli import (
    EXIT_TERMINATED,
    EXIT_USAGE,
    EXIT_USER_ERROR,
    UsageError,
    check_output_file,
    one_line,
    run_cli,
)
from bnzoo.signals import Terminated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_code(code, cwd=ROOT):
    """`python -c code` in a fresh process that imports this checkout."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": ROOT},
    )


def failing(error):
    def main(argv):
        raise error

    return main


def test_value_error_is_one_line_on_stderr_and_exit_1(capsys):
    status = run_cli(failing(ValueError("unknown model 'plain_cn'")), [], prog="train.py")
    captured = capsys.readouterr()
    assert status == EXIT_USER_ERROR == 1
    assert captured.err == "train.py: error: unknown model 'plain_cn'\n"
    assert captured.out == ""


def test_usage_error_exits_2(capsys):
    assert run_cli(failing(UsageError("bad flag")), [], prog="x") == EXIT_USAGE == 2
    assert capsys.readouterr().err == "x: error: bad flag\n"


def test_missing_file_is_a_user_error(capsys):
    assert run_cli(failing(FileNotFoundError("no IDX files in /data")), [], prog="x") == 1
    assert capsys.readouterr().err == "x: error: no IDX files in /data\n"


def test_multi_line_messages_are_joined_into_one_line(capsys):
    run_cli(failing(ValueError("first line\n  second line\n")), [], prog="x")
    assert capsys.readouterr().err == "x: error: first line second line\n"


def test_debug_shows_the_traceback_of_user_errors():
    with pytest.raises(ValueError, match="boom"):
        run_cli(failing(ValueError("boom")), ["--debug"], prog="x")


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli(failing(ZeroDivisionError("a bug, not a user error")), [], prog="x")


def test_keyboard_interrupt_exits_130(capsys):
    assert run_cli(failing(KeyboardInterrupt()), [], prog="x") == 130
    assert capsys.readouterr().err == "x: interrupted\n"


def test_success_returns_mains_status():
    assert run_cli(lambda argv: None, []) == 0
    assert run_cli(lambda argv: 3, []) == 3


def test_bnzoos_log_records_are_the_scripts_lines_on_stdout_while_main_runs(capsys):
    """One line per record, the message as it is (a warning says so), flushed as it comes; an
    error is still the one line on stderr, even when another library gave the root logger a
    handler. Afterwards bnzoo's loggers print nothing again."""
    logger = logging.getLogger("bnzoo.training")
    seen_by_main = []
    at_the_root = logging.handlers.BufferingHandler(capacity=100)
    logging.root.addHandler(at_the_root)  # as logging.warning() does where root has none

    def main(argv):
        logger.info("run folder: %s", "runs/x")
        logger.debug("not a progress line")
        logger.warning("--momentum 0.5 has no effect with --optimizer adam")
        seen_by_main.append(capsys.readouterr().out)  # written and flushed already
        logging.getLogger("elsewhere").warning("another library's record")
        raise ValueError("the data is missing")

    try:
        assert run_cli(main, [], prog="train.py") == EXIT_USER_ERROR
    finally:
        logging.root.removeHandler(at_the_root)
    assert [record.name for record in at_the_root.buffer] == ["elsewhere"]
    assert seen_by_main == [
        "run folder: runs/x\nwarning: --momentum 0.5 has no effect with --optimizer adam\n"
    ]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "train.py: error: the data is missing\n"
    assert logging.getLogger("bnzoo").handlers == []
    assert logging.getLogger("bnzoo").level == logging.NOTSET
    assert logging.getLogger("bnzoo").propagate


def test_library_code_configures_no_logging():
    """Importing bnzoo's modules adds no handler and sets no level: what a program that uses
    them sees of their records is its own logging configuration's choice."""
    code = (
        "import logging\n"
        "from bnzoo import cli, distribution, evaluation, rendezvous, training\n"
        "from bnzoo.export import tflite\n"
        "names = [n for n in logging.root.manager.loggerDict if n.split('.')[0] == 'bnzoo']\n"
        "loggers = [logging.getLogger(name) for name in names]\n"
        "print(len(loggers), [h for l in loggers for h in l.handlers], {l.level for l in loggers})"
    )
    result = python_code(code)
    assert result.returncode == 0, result.stderr[-2000:]
    count, handlers, levels = result.stdout.split(" ", 2)
    assert int(count) >= 6  # bnzoo, bnzoo.training, bnzoo.rendezvous, ...
    assert (handlers, levels.strip()) == ("[]", "{0}")


def test_one_line_names_the_file_of_a_bare_os_error():
    error = FileNotFoundError(2, "No such file or directory", "/data/x.gz")
    assert one_line(error) == "[Errno 2] No such file or directory: '/data/x.gz'"


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("train.py", ["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
        ("evaluate.py", ["--batch-size", "0", "x"], "argument --batch-size: must be a positive"),
        ("evaluate.py", [], "the following arguments are required: PATH"),
    ],
)
def test_scripts_report_argument_errors_in_one_line_without_importing_tensorflow(
    script, argv, message, run_script
):
    result = run_script.run(script, *argv)
    assert result.stdout == ""
    assert message in run_script.error_line(result, EXIT_USAGE, script)


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_scripts_help_exits_0_and_states_the_exit_status_rule(script, run_script):
    result = run_script.run(script, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "Exit status: 0 on success; 2 when the command line itself is wrong" in text
    if script == "train.py":
        for group in ("model:", "data:", "optimization:", "run:", "--lr-schedule", "--model-arg"):
            assert group in result.stdout


def test_sigterm_becomes_terminated_and_exits_143(capsys):
    def main(argv):
        os.kill(os.getpid(), signal.SIGTERM)

    assert run_cli(main, [], prog="x") == EXIT_TERMINATED == 143
    assert capsys.readouterr().err == "x: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again


def test_an_interruption_message_from_main_is_what_the_user_reads(capsys):
    status = run_cli(failing(Terminated("interrupted after 2 epochs; rerun to resume")), [])
    assert status == 143
    assert capsys.readouterr().err.endswith(": interrupted after 2 epochs; rerun to resume\n")


def test_output_file_checks_name_the_flag_and_the_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--output .*missing/m.json: folder .* does not"):
        check_output_file(str(tmp_path / "missing" / "m.json"), "--output")
    with pytest.raises(ValueError, match="is a folder"):
        check_output_file(str(tmp_path), "--output")
    check_output_file(str(tmp_path / "m.json"), "--output")  # fine: nothing raised


@pytest.mark.parametrize(
    "argv", [["--lr", "inf"], ["--bn-momentum", "0.5", "--normalization", "none"], ["--seed", "-1"]]
)
def test_argument_errors_are_answered_without_importing_tensorflow(argv, tmp_path):
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['train.py', *{argv!r}]\n"
        "try:\n"
        f"    runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    print(exit.code, 'tensorflow' in sys.modules)\n"
    )
    result = python_code(probe, cwd=tmp_path)
    assert result.stdout.split() == ["2", "False"], result.stderr


class _InterruptedWhileCollected:
    """Receives a signal in `__del__`, where Python drops any exception ("Exception ignored"),
    as it does inside garbage-collection callbacks."""

    def __init__(self, signal_number):
        self.signal_number = signal_number

    def __del__(self):
        os.kill(os.getpid(), self.signal_number)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "signal_number, interruption",
    [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, signals.Terminated)],
)
def test_an_interruption_that_python_swallowed_is_raised_again(signal_number, interruption):
    before = signal.getsignal(signal_number)
    with signals.signals_raise_interruptions():
        _InterruptedWhileCollected(signal_number)  # collected at once: the signal comes in __del__
        swallowed = True  # reached: Python dropped the exception the handler raised
        with pytest.raises(interruption) as raised:
            signals.raise_if_interrupted()
        assert type(raised.value) is interruption
    assert swallowed
    signals.raise_if_interrupted()  # forgotten once the block is left
    assert signal.getsignal(signal_number) is before


@pytest.mark.parametrize(
    "signal_number, interruption",
    [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, signals.Terminated)],
)
def test_an_interruption_during_a_deferred_write_waits_for_its_end(signal_number, interruption):
    finished = []
    with signals.signals_raise_interruptions():
        with pytest.raises(interruption):
            with signals.interruptions_deferred():
                with signals.interruptions_deferred():  # nested: raised by the outermost
                    os.kill(os.getpid(), signal_number)
                    finished.append("inner")
                finished.append("outer")
        assert finished == ["inner", "outer"]


def test_a_deferred_block_that_fails_raises_its_own_error_and_nothing_is_pending():
    with signals.signals_raise_interruptions():
        with pytest.raises(OSError, match="disk full"):
            with signals.interruptions_deferred():
                raise OSError("disk full")
        signals.raise_if_interrupted()  # no signal came: nothing to raise


def test_a_sigterm_during_a_checkpoint_commit_finishes_the_commit_then_stops(tmp_path):
    """The epoch's commit (last.keras, best.keras, history.csv) completes whole when SIGTERM
    arrives in the middle of it, and the interruption follows it."""
    import keras

    from bnzoo.callbacks import RunCheckpoint
    from bnzoo.run_folder import RunPaths, read_checkpoint_state

    paths = RunPaths(str(tmp_path))
    os.makedirs(paths.checkpoints)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    state = {"format": 1, "epoch": 0, "history": [], "best": None}
    callback = RunCheckpoint(paths, state, monitor="val_accuracy")
    callback.set_model(model)

    real_save = model.save

    def save_with_a_signal_inside(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # lands inside the checkpoint's write
        real_save(*args, **kwargs)

    model.save = save_with_a_signal_inside
    with signals.signals_raise_interruptions():
        with pytest.raises(signals.Terminated):
            callback.on_epoch_end(0, {"loss": 1.0, "val_accuracy": 0.5, "learning_rate": 0.1})
    assert read_checkpoint_state(paths.last_checkpoint)["epoch"] == 1
    assert read_checkpoint_state(paths.best_checkpoint)["epoch"] == 1
    assert os.path.isfile(paths.history)
    assert sorted(os.listdir(paths.checkpoints)) == ["best.keras", "last.keras"]


def test_a_signal_inside_a_gc_callback_is_kept_for_later_not_dropped_with_a_traceback(
    monkeypatch,
):
    """JAX registers a garbage-collection callback; an exception raised there is dropped and
    printed as "Exception ignored in ..." on stderr, which a one-line CLI must not show."""
    import gc

    dropped = []
    monkeypatch.setattr("sys.unraisablehook", dropped.append)

    def callback(phase, info):
        if phase == "start":
            os.kill(os.getpid(), signal.SIGINT)

    with signals.signals_raise_interruptions():
        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)
        assert dropped == []
        with pytest.raises(KeyboardInterrupt):
            signals.raise_if_interrupted()
