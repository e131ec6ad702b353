"""A run killed with SIGKILL mid-training resumes from its last finished epoch: each epoch appears
exactly once in history.csv, the optimizer state (its step counter) carries over, and the rerun
finishes with every artifact."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import keras
import pytest
from conftest import unfinished_run_files, wait_until

from bnzoo.optimization import WarmupSchedule
from bnzoo.run_folder import RunPaths, read_checkpoint_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
TRAIN_EXAMPLES, BATCH_SIZE = 1536, 32
STEPS_PER_EPOCH = TRAIN_EXAMPLES // BATCH_SIZE


def command(output_dir):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--train-split",
        f"train[:{TRAIN_EXAMPLES}]",
        "--val-split",
        "train[1536:1664]",
        "--test-split",
        "test[:128]",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        str(BATCH_SIZE),
        "--model-arg",
        "widths=[8,16]",
        "--output-dir",
        output_dir,
    ]


#: Loads a checkpoint as a user does: importing keras, layers and models only.
LOAD_WITH_LAYERS_AND_MODELS = """
import json, sys
import keras, layers, models
checkpoint = keras.saving.load_model(sys.argv[1])
optimizer = checkpoint.optimizer
print(json.dumps({
    "iterations": int(optimizer.iterations),
    "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
    "optimizer": type(optimizer).__name__,
    "bnzoo": sorted(name for name in sys.modules if name.split(".")[0] == "bnzoo"),
}))
"""


def committed_epoch(paths):
    """The epoch in checkpoints/last.keras; reading it while the trainer writes is safe because
    the file is only ever replaced whole (a torn read would raise ValueError and fail the test)."""
    state = read_checkpoint_state(paths.last_checkpoint)
    return 0 if state is None else state["epoch"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_finishes_each_epoch_exactly_once(tmp_path):
    output_dir = str(tmp_path / "run")
    paths = RunPaths(output_dir)
    log = open(tmp_path / "first.log", "w")
    process = subprocess.Popen(command(output_dir), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_until(
            lambda: committed_epoch(paths) >= 1,
            [process],
            "the first epoch never finished",
            output=lambda: (tmp_path / "first.log").read_text()[-3000:],
        )
        # A moment into the second epoch (its 48 steps take longer than this), then kill
        # without warning.
        time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    killed_at = committed_epoch(paths)
    assert 0 < killed_at < EPOCHS, "the kill came too late to test resuming"
    # history.csv is rewritten from the committed rows right after each commit, so at the kill
    # it holds every committed epoch or lags one behind; never a partial or duplicate row.
    with open(paths.history, newline="") as stream:
        epochs_in_csv = [int(row["epoch"]) for row in csv.DictReader(stream)]
    assert epochs_in_csv in (list(range(1, killed_at + 1)), list(range(1, killed_at)))

    rerun = subprocess.run(
        command(output_dir), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"resuming {output_dir} after epoch {killed_at} of {EPOCHS}" in rerun.stdout
    # The rerun trained only the missing epochs, one summary line each.
    trained = [line for line in rerun.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in trained] == [
        f"{epoch}/{EPOCHS}" for epoch in range(killed_at + 1, EPOCHS + 1)
    ]

    with open(paths.history, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(row["epoch"]) for row in rows] == list(range(1, EPOCHS + 1))
    assert unfinished_run_files(output_dir) == []

    # The optimizer state came back: its step counter counts every epoch exactly once. A resume
    # that rebuilt a fresh optimizer would restart it (and the learning-rate schedule) at 0. The
    # checkpoint holds a plain Keras optimizer: it loads with keras, layers and models alone.
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_LAYERS_AND_MODELS, paths.last_checkpoint],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    checkpoint = json.loads(loaded.stdout.splitlines()[-1])
    assert checkpoint["bnzoo"] == []
    assert (checkpoint["optimizer"], checkpoint["iterations"]) == ("SGD", EPOCHS * STEPS_PER_EPOCH)
    # The learning rate followed the schedule across the kill: each epoch's row holds the rate
    # of the schedule (lr 0.1, half an epoch of warmup, cosine) at that epoch's last step.
    schedule = WarmupSchedule(
        0.1, STEPS_PER_EPOCH // 2, EPOCHS * STEPS_PER_EPOCH, steps_per_epoch=STEPS_PER_EPOCH
    )
    expected = [
        float(keras.ops.convert_to_numpy(schedule(epoch * STEPS_PER_EPOCH)))
        for epoch in range(1, EPOCHS + 1)
    ]
    assert [float(row["learning_rate"]) for row in rows] == pytest.approx(expected, abs=1e-7)
    assert checkpoint["learning_rate"] == pytest.approx(expected[-1], abs=1e-7)
    state = read_checkpoint_state(paths.last_checkpoint)
    assert state["epoch"] == EPOCHS
    assert [row["epoch"] for row in state["history"]] == list(range(1, EPOCHS + 1))


def start(argv, log_path):
    log = open(log_path, "w")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    return process, log


@pytest.mark.slow
def test_sigterm_after_an_epoch_exits_143_saying_that_rerunning_resumes(tmp_path):
    output_dir = str(tmp_path / "run")
    paths = RunPaths(output_dir)
    process, log = start(command(output_dir), tmp_path / "out.log")
    try:
        wait_until(
            lambda: committed_epoch(paths) >= 1,
            [process],
            "the first epoch never finished",
            output=process.stderr.read,
        )
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert process.returncode == 143, stderr[-3000:]
    epochs = committed_epoch(paths)
    assert 0 < epochs < EPOCHS, "the signal came too late to test"
    assert stderr.splitlines() == [
        f"train.py: terminated; {output_dir} holds {epochs} of {EPOCHS} epochs: rerunning the "
        "same command resumes from there"
    ]
    assert not [name for name in os.listdir(paths.checkpoints) if ".tmp-" in name]


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_exits_130_and_leaves_no_run_folder(tmp_path):
    """Nothing was committed, so nothing is kept: no half-made folder to block a changed
    command. The training split is large so that the first epoch outlasts the test's polling."""
    output_dir = str(tmp_path / "run")
    argv = [*command(output_dir), "--train-split", "train[:20000]", "--val-split", "none"]
    process, log = start(argv, tmp_path / "out.log")
    try:
        wait_until(
            lambda: "training plain_cnn" in (tmp_path / "out.log").read_text(),
            [process],
            "training never started",
            output=process.stderr.read,
        )
        assert committed_epoch(RunPaths(output_dir)) == 0
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.splitlines() == [
        "train.py: interrupted before the first epoch finished; nothing was kept, so rerunning "
        "the same command starts the run again"
    ]
    assert not os.path.exists(output_dir)


@pytest.mark.slow
@pytest.mark.parametrize("diverged_epoch", [1, 2])
def test_a_diverged_epoch_keeps_only_the_finite_epochs_before_it(
    diverged_epoch, tmp_path, monkeypatch, logged_lines
):
    """The loop stops at the first epoch whose loss is not finite (forced here: a real
    divergence depends on the machine's rounding). Diverged in epoch 1, there is nothing to
    keep and the folder goes; in epoch 2, the run folder keeps epoch 1 to resume from."""
    from bnzoo import training_loop
    from bnzoo.config import TrainConfig
    from bnzoo.training import train

    trained = training_loop.TrainingLoop.train_epoch
    epochs = []

    def train_epoch(self, *args, **kwargs):
        logs = trained(self, *args, **kwargs)
        epochs.append(logs)
        if len(epochs) == diverged_epoch:
            logs["loss"] = float("nan")
        return logs

    monkeypatch.setattr(training_loop.TrainingLoop, "train_epoch", train_epoch)
    run_dir = tmp_path / "run"
    config = TrainConfig(
        train_split="train[:128]",
        val_split=None,
        test_split=None,
        epochs=2,
        batch_size=64,
        model_args={"widths": [4, 8]},
        output_dir=str(run_dir),
    )
    with pytest.raises(ValueError) as raised:
        train(config)
    message = (
        f"training diverged: the loss was not finite in epoch {diverged_epoch}; lower --lr "
        "(now 0.1) or add --warmup-epochs"
    )
    if diverged_epoch == 1:
        assert str(raised.value) == message
        assert f"removed {run_dir}: the run stopped before finishing an epoch" in logged_lines()
        assert not run_dir.exists()
    else:
        assert str(raised.value) == f"{message}. The run folder keeps the last finite epoch (1)"
        assert committed_epoch(RunPaths(str(run_dir))) == 1


@pytest.mark.slow
def test_a_damaged_last_checkpoint_resumes_from_best_when_asked(tmp_path, logged_lines):
    """A damaged last.keras is refused with the way on (`--resume-from best`), not --overwrite,
    which would delete the intact best.keras; with it, the run continues from best.keras."""
    from bnzoo.config import TrainConfig
    from bnzoo.training import train

    run_dir = tmp_path / "run"
    options = dict(
        train_split="train[:128]",
        val_split="train[128:192]",
        test_split=None,
        batch_size=64,
        model_args={"widths": [4, 8]},
        output_dir=str(run_dir),
    )
    train(TrainConfig(**options, epochs=2))
    paths = RunPaths(str(run_dir))
    best_epoch = read_checkpoint_state(paths.best_checkpoint)["epoch"]
    with zipfile.ZipFile(paths.last_checkpoint, "w") as archive:  # readable zip, no state
        archive.writestr("config.json", "{}")
    with pytest.raises(ValueError) as raised:
        train(TrainConfig(**options, epochs=3))
    assert "last.keras is not a readable bnzoo checkpoint" in str(raised.value)
    assert f"is intact (epoch {best_epoch}): rerun with --resume-from best" in str(raised.value)
    assert "--overwrite" not in str(raised.value)
    result = train(TrainConfig(**options, epochs=3, resume_from="best"))
    assert result.resumed_from_epoch == best_epoch
    assert f"resuming from {paths.best_checkpoint} (epoch {best_epoch})" in "\n".join(
        logged_lines()
    )
    state = read_checkpoint_state(paths.last_checkpoint)
    assert [row["epoch"] for row in state["history"]] == [1, 2, 3]
