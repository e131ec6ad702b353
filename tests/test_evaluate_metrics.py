"""evaluate.py's metrics, table, JSON and PNG, and how it recognizes (or refuses) PATH."""

import json
import zipfile

import numpy as np
import pytest

from bnzoo.evaluation import (
    compute_metrics,
    format_metrics_table,
    locate_model,
    save_confusion_matrix_png,
    save_metrics_json,
)

CLASSES = ("cat", "dog", "eel", "fox", "gnu", "hen")


@pytest.fixture
def example():
    """Six classes, five examples, outcomes chosen by hand."""
    logits = np.array(
        [
            [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # true cat, predicted cat
            [0.0, 1.0, 3.0, 2.0, 0.0, 0.0],  # true dog, predicted eel; dog ranks 3rd: top-5 hit
            [0.0, 0.0, 0.0, 0.0, 0.0, 9.0],  # true cat: all others tie at 0 -> in the top 5
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # true cat, the lowest logit: ranks 6th, a top-5 miss
            [0.0, 0.0, 0.0, 0.0, 4.0, 0.0],  # true gnu, predicted gnu
        ]
    )
    labels = np.array([0, 1, 0, 0, 4])
    return logits, labels


def test_metrics_match_hand_computed_values(example):
    logits, labels = example
    metrics = compute_metrics(logits, labels, CLASSES)

    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected_loss = -np.mean([log_softmax[i, y] for i, y in enumerate(labels)])
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert metrics["num_examples"] == 5
    assert metrics["accuracy"] == pytest.approx(2 / 5)
    assert metrics["top5_accuracy"] == pytest.approx(4 / 5)
    assert metrics["per_class_accuracy"] == {
        "cat": pytest.approx(1 / 3),
        "dog": 0.0,
        "eel": None,  # no example of the class: undefined, not 0
        "fox": None,
        "gnu": 1.0,
        "hen": None,
    }
    expected_confusion = np.zeros((6, 6), int)
    for true, predicted in [(0, 0), (1, 2), (0, 5), (0, 5), (4, 4)]:
        expected_confusion[true, predicted] += 1
    assert metrics["confusion_matrix"] == expected_confusion.tolist()
    assert metrics["class_names"] == list(CLASSES)


def test_top5_accuracy_agrees_with_keras(example):
    import keras

    logits, labels = example
    metric = keras.metrics.SparseTopKCategoricalAccuracy(k=5)
    metric.update_state(labels, logits.astype("float32"))
    assert compute_metrics(logits, labels, CLASSES)["top5_accuracy"] == pytest.approx(
        float(metric.result())
    )


def test_loss_is_stable_for_huge_logits():
    metrics = compute_metrics(np.array([[1000.0, 0.0]]), np.array([1]), ("a", "b"))
    assert metrics["loss"] == pytest.approx(1000.0)


def test_class_count_mismatch_says_which_dataset_to_use():
    with pytest.raises(ValueError, match="predicts 3 classes but the dataset has 6"):
        compute_metrics(np.zeros((2, 3)), np.array([0, 1]), CLASSES)


def test_metrics_json_round_trips(tmp_path, example):
    metrics = {"model": "m", **compute_metrics(*example, CLASSES), "images_per_second": 12.5}
    path = save_metrics_json(metrics, tmp_path / "metrics.json")
    assert json.loads(open(path).read()) == metrics


def test_table_shows_headline_metrics_per_class_accuracy_and_confusion(example):
    metrics = {
        "model": "runs/x/saved_model",
        "dataset": "toy",
        "split": "test",
        **compute_metrics(*example, CLASSES),
        "images_per_second": 1234.0,
    }
    table = format_metrics_table(metrics)
    assert "accuracy        40.00%" in table
    assert "top-5 accuracy  80.00%" in table
    assert "1,234 images/s" in table
    assert "  cat   33.3%  (3 examples)" in table
    assert "  dog    0.0%  (1 example)" in table
    assert "  eel     n/a  (0 examples)" in table
    # Rows carry the index that numbers the columns: no unlabelled column.
    assert table.endswith(
        "confusion matrix (rows: true class, columns: predicted class, numbered as the rows):\n"
        "           0    1    2    3    4    5\n"
        "  0 cat    1    0    0    0    0    2\n"
        "  1 dog    0    0    1    0    0    0\n"
        "  2 eel    0    0    0    0    0    0\n"
        "  3 fox    0    0    0    0    0    0\n"
        "  4 gnu    0    0    0    0    1    0\n"
        "  5 hen    0    0    0    0    0    0"
    )


def test_top5_is_left_out_with_five_classes_or_fewer(example):
    logits, labels = example
    labels = np.minimum(labels, 4)
    five = compute_metrics(logits[:, :5], labels, CLASSES[:5])
    assert "top5_accuracy" not in five  # every prediction is in the top 5: meaningless
    assert "top-5" not in format_metrics_table({**five, "images_per_second": 1.0})
    assert compute_metrics(logits, labels, CLASSES)["top5_accuracy"] == pytest.approx(0.8)


def test_confusion_matrix_png_is_written(tmp_path, example):
    metrics = {"dataset": "toy", "split": "test", **compute_metrics(*example, CLASSES)}
    path = save_confusion_matrix_png(metrics, tmp_path / "cm.png")
    with open(path, "rb") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"


def test_path_that_does_not_exist_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate_model(str(tmp_path / "nowhere"))


def test_folder_that_is_not_a_model_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="is not a model: expected a SavedModel folder"):
        locate_model(str(tmp_path))


def test_file_that_is_not_a_model_is_a_value_error(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"is not a model: expected a .keras file"):
        locate_model(str(path))


def test_zip_that_is_not_a_keras_model_is_refused(tmp_path):
    path = tmp_path / "weights.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "no model here")
    with pytest.raises(ValueError, match="not a .keras model"):
        locate_model(str(path))


def test_run_folder_without_a_model_says_to_finish_the_run(tmp_path):
    (tmp_path / "config.yaml").write_text("model: plain_cnn\n")
    with pytest.raises(ValueError, match="has no trained model yet"):
        locate_model(str(tmp_path))
