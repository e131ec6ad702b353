"""The paper's experiments (experiments/): each runs end to end on a tiny budget and writes its
config, a strictly finite JSON of its measurements and real PNG plots; the harness they share
trains, probes and records what it claims to.

The five scripts run once per test session (a module fixture) on their ``smoke`` budget; the
tests then read what they wrote.
"""

import json
import math
import struct

import keras
import numpy as np
import pytest
import tensorflow as tf

from bnzoo.config import RECIPES
from experiments import (
    exp1_mnist_mlp,
    exp2_diagnostics,
    exp2_learning_rates,
    exp3_sigmoid_cnn,
    exp4_gradients,
    exp5_layer_vs_keras,
    harness,
    report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SCRIPTS = {
    "exp1_mnist_mlp": exp1_mnist_mlp,
    "exp2_learning_rates": exp2_learning_rates,
    "exp2_diagnostics": exp2_diagnostics,
    "exp3_sigmoid_cnn": exp3_sigmoid_cnn,
    "exp4_gradients": exp4_gradients,
    "exp5_layer_vs_keras": exp5_layer_vs_keras,
}

EXPECTED_PLOTS = {
    "exp1_mnist_mlp": [
        "fashion_mnist_figure1a_accuracy.png",
        "fashion_mnist_figure1bc_sigmoid_input.png",
    ],
    "exp2_learning_rates": ["plain_cnn_accuracy.png", "bn_inception_accuracy.png"],
    "exp2_diagnostics": ["diagnostics_accuracy.png"],
    "exp3_sigmoid_cnn": ["sigmoid_cnn_accuracy.png"],
    "exp4_gradients": ["gradient_norms.png", "preactivation_histograms.png"],
    "exp5_layer_vs_keras": ["plain_cnn_layer_vs_keras.png", "paper_mlp_layer_vs_keras.png"],
}


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    """Every experiment run once on its smoke budget, into one results root."""
    root = tmp_path_factory.mktemp("experiments")
    for name, script in SCRIPTS.items():
        assert script.main(["--budget", "smoke", "--output-dir", str(root / name)]) == 0, name
    return root


def _strict_json(path):
    """Parses ``path``, failing on NaN / Infinity, which Python's json would otherwise accept."""

    def reject(constant):
        raise AssertionError(f"{path} holds the non-finite number {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def _numbers(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _numbers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _numbers(value)
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield node


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG file"
    # The IHDR chunk comes first: width and height are its first two big-endian integers.
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_experiment_writes_config_finite_results_and_real_png_plots(smoke_root, name):
    folder = smoke_root / name
    config = _strict_json(folder / "config.json")
    assert config["budget"] == "smoke" and config["seed"] == 0 and config["experiment"] == name

    results = _strict_json(folder / "results.json")
    assert results["experiment"] == name and results["budget"] == "smoke"
    assert results["runtime_seconds"] > 0
    assert results["environment"]["tensorflow"] == tf.__version__
    numbers = list(_numbers(results))
    assert len(numbers) > 20
    assert all(math.isfinite(n) for n in numbers)

    import matplotlib.image

    for plot in EXPECTED_PLOTS[name]:
        path = folder / plot
        width, height = _png_size(path)
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[:2] == (height, width) and pixels.shape[2] in (3, 4)
        assert width > 300 and height > 200
        # A plot has lines and text, not one flat colour.
        assert len(np.unique(pixels[::3, ::3].reshape(-1, pixels.shape[2]), axis=0)) > 50


def test_exp1_records_ordered_percentiles_of_the_last_sigmoid_input_at_every_evaluation(smoke_root):
    results = _strict_json(smoke_root / "exp1_mnist_mlp" / "results.json")
    data = results["datasets"]["fashion_mnist"]
    assert data["probe_layer"] == "hidden_3_preactivation"
    for run in data["runs"].values():
        assert run["steps"] == [0, 20, 40]
        probes = run["probes"]["sigmoid_input"]
        assert len(probes) == len(run["steps"])
        for point in probes:
            p15, p50, p85 = point["unit"]
            assert p15 <= p50 <= p85
    # The target is the no-BN run's best accuracy, which that run first reaches at its best step.
    baseline = data["runs"]["without_bn"]
    assert data["target_accuracy"] == baseline["summary"]["best_eval_accuracy"]
    assert data["steps_to_target"]["without_bn"] == baseline["summary"]["best_eval_step"]
    assert "--mnist-dir" in results["skipped"]["mnist"]
    assert [row["learning_rate"] for row in results["learning_rate_sweep"]] == [0.1]


def test_exp2_target_is_the_no_bn_baseline_best_and_every_variant_has_a_row(smoke_root):
    results = _strict_json(smoke_root / "exp2_learning_rates" / "results.json")
    config = _strict_json(smoke_root / "exp2_learning_rates" / "config.json")
    data = results["models"]["plain_cnn"]
    baseline = data["runs"]["no_bn_x1"]
    assert data["target_accuracy"] == max(baseline["eval_accuracy"])
    assert [row["key"] for row in data["rows"]] == [
        harness.variant_key(v["normalization"], v["multiplier"])
        for v in config["plain_cnn_variants"]
    ]
    for row in data["rows"]:
        assert row["learning_rate"] == pytest.approx(0.01 * float(row["key"].rsplit("_x", 1)[1]))
        # Constant: every evaluation records the run's rate (read back from a float32 variable).
        rates = data["runs"][row["key"]]["learning_rate"]
        assert rates == [pytest.approx(row["learning_rate"], rel=2**-23)] * len(rates)


def test_exp2_bn_inception_runs_are_the_papers_recipes_on_64x64_inputs(smoke_root):
    results = _strict_json(smoke_root / "exp2_learning_rates" / "results.json")
    config = _strict_json(smoke_root / "exp2_learning_rates" / "config.json")
    data = results["models"]["bn_inception"]
    section = config["bn_inception"]
    assert data["input_shape"] == [64, 64, 1]  # 3a then sees 8x8 maps
    assert [row["key"] for row in data["rows"]] == [run["key"] for run in section["runs"]]
    inception = data["runs"]["inception"]
    assert data["target_accuracy"] == max(inception["eval_accuracy"])
    # The evaluation points follow the preset's phases: every step to 2, then every 2 to 4.
    assert inception["steps"] == [0, 1, 2, 4]
    per_epoch = data["steps_per_schedule_epoch"]
    assert per_epoch == pytest.approx(4 / exp2_learning_rates.PAPER_INCEPTION_EPOCHS)
    for key, run_config in data["configs"].items():
        recipe = RECIPES[run_config["recipe"]].values
        # Every value comes from the recipe, the run's own options over it.
        assert run_config["lr"] == recipe["lr"]
        assert run_config["weight_decay"] == recipe["weight_decay"]
        assert run_config["model_args"] == {**recipe["model_args"], **section["model_args"]}
        # The recorded rate is GoogLeNet's staircase, in steps that stand for ImageNet epochs.
        every = run_config["lr_decay_epochs"] * per_epoch
        expected = [
            run_config["lr"] * run_config["lr_decay_rate"] ** math.floor(step / every)
            for step in data["runs"][key]["steps"]
        ]
        assert data["runs"][key]["learning_rate"] == pytest.approx(expected, rel=1e-5)
    assert data["configs"]["inception"]["normalization"] == "none"
    assert data["configs"]["bn_x30"]["recipe"] == "paper_bn_accelerated_x30"
    report_text = exp2_learning_rates.report(results)
    assert (
        "| BN-x30 | 0.045 | 2.7 M | 11.5x | 74.8% | 0.045 |"
        in (report_text["bn_inception_figure3_table"])
    )


def test_exp2_diagnostics_switch_one_change_off_and_record_every_probed_layer(smoke_root):
    results = _strict_json(smoke_root / "exp2_diagnostics" / "results.json")
    configs = results["configs"]
    slow = configs["bn_x5_inception_decay"]
    # BN-x5 with the accelerated decay switched off: Inception's decay, every other change kept.
    assert slow["lr_decay_epochs"] == configs["inception"]["lr_decay_epochs"] == 8
    assert (slow["lr"], slow["weight_decay"]) == (0.0075, pytest.approx(4e-5))
    assert slow["model_args"]["lrn"] is False
    run = results["runs"]["inception"]
    points = run["probes"]["nonlinearity_inputs"]
    assert len(points) == len(run["steps"]) == len(run["probes"]["gradient_norms"])
    for layer in exp2_diagnostics.PROBED_CONVOLUTIONS:
        channels = results["layer_statistics"]["inception"][layer]["channels"]
        assert len(points[-1][layer]["mean"]) == len(points[-1][layer]["std"]) == channels
        assert all(std > 0 for std in points[0][layer]["std"])
    # The probes only look: the same seed trains exactly as experiment 2's Inception does.
    same = _strict_json(smoke_root / "exp2_learning_rates" / "results.json")
    assert run["train_loss"] == same["models"]["bn_inception"]["runs"]["inception"]["train_loss"]
    assert "bn_x5_inception_decay" not in results["layer_statistics"]  # not probed


def test_exp4_gradient_norms_cover_every_layer_at_every_evaluation(smoke_root):
    results = _strict_json(smoke_root / "exp4_gradients" / "results.json")
    layers = results["kernel_layers"]
    assert layers == ["hidden_1_dense", "hidden_2_dense", "hidden_3_dense", "predictions"]
    for run in results["runs"].values():
        norms = run["probes"]["gradient_norms"]
        assert len(norms) == len(run["steps"])
        assert all(point[layer] > 0 for point in norms for layer in layers)
        ratios = run["first_to_last_hidden_gradient_ratio"]
        assert ratios[0] == pytest.approx(norms[0]["hidden_1_dense"] / norms[0]["hidden_3_dense"])
        derivatives = run["probes"]["sigmoid_inputs"][0]["mean_sigmoid_derivative"]
        assert all(0 < d <= 0.25 for d in derivatives)  # sigmoid' never exceeds 1/4


def test_exp5_both_layers_start_identical_and_agree_on_the_first_step(smoke_root):
    results = _strict_json(smoke_root / "exp5_layer_vs_keras" / "results.json")
    for data in results["networks"].values():
        assert data["identical_initial_weights_from_seed"]
        first = {key: run["step_losses"][0] for key, run in data["runs"].items()}
        # Same weights, same batch, the same algorithm: float32 rounding apart, the same loss.
        assert first["bnzoo"] == pytest.approx(first["keras"], rel=1e-5)
        assert data["timing"]["bnzoo"]["steady_state_epoch_seconds"] > 0


def test_report_fills_every_placeholder_from_the_json(smoke_root):
    results = report.load_results(smoke_root)
    assert set(results) == set(SCRIPTS)
    text = report.render(report.TEMPLATE.read_text(), results, smoke_root, "figures")
    assert "{{" not in text and "not run yet" not in text
    assert "(figures/exp4_gradients/gradient_norms.png)" in text
    sweep = report.build_context(results)["exp1_mnist_mlp.sweep_table"]
    assert sweep.splitlines()[2].startswith("| 0.1 |")


def test_publishing_copies_the_json_and_the_shown_plots_and_renders_from_them(smoke_root, tmp_path):
    template = report.TEMPLATE.read_text()
    stale = tmp_path / "exp4_gradients" / "old_plot.png"
    stale.parent.mkdir()
    stale.write_bytes(b"")
    assert report.publish(smoke_root, tmp_path, template) == list(SCRIPTS)
    assert not stale.exists()
    for name in SCRIPTS:
        shown = {f.split("/", 1)[1] for f in report.figures(template) if f.startswith(name)}
        files = {p.name for p in (tmp_path / name).iterdir()}
        assert files == {"results.json", "config.json"} | shown, name
        assert _strict_json(tmp_path / name / "results.json") == _strict_json(
            smoke_root / name / "results.json"
        )
    published = report.render(template, report.load_results(tmp_path), tmp_path, "results")
    original = report.render(template, report.load_results(smoke_root), smoke_root, "results")
    assert published == original


def test_results_md_is_exactly_what_report_renders_from_the_committed_json():
    # docs/RESULTS.md is generated: its tables must be the committed measurements, so that
    # anyone can check them, and editing the document by hand is caught.
    results = report.load_results(report.PUBLISHED_ROOT)
    assert set(results) == set(report.EXPERIMENTS), "docs/results/ lacks an experiment's JSON"
    rendered = report.render(report.TEMPLATE.read_text(), results, report.PUBLISHED_ROOT, "results")
    assert rendered == (report.DOCS / "RESULTS.md").read_text(), (
        "docs/RESULTS.md differs from what experiments/report.py renders from docs/results/: "
        "run `python experiments/report.py --update-docs --results-root docs/results`."
    )
    shown = set(report.figures(report.TEMPLATE.read_text()))
    committed = {
        str(p.relative_to(report.PUBLISHED_ROOT))
        for p in report.PUBLISHED_ROOT.rglob("*")
        if p.is_file() and p.name not in report.PUBLISHED_FILES
    }
    assert committed == shown, "docs/results/ holds plots the document does not show"


def test_report_marks_experiments_that_have_not_run(tmp_path):
    text = report.render(
        "{{exp3_sigmoid_cnn.table}}\n{{figure:exp4_gradients/gradient_norms.png}}",
        {},
        tmp_path,
        "figures",
    )
    assert text.count("not run yet") == 2 and "experiments/exp3_sigmoid_cnn.py" in text


def test_report_rejects_unknown_placeholders(smoke_root):
    results = report.load_results(smoke_root)
    with pytest.raises(ValueError, match="exp1_mnist_mlp.no_such_table"):
        report.render("{{exp1_mnist_mlp.no_such_table}}", results, smoke_root, ".")


def test_script_turns_a_bad_option_into_one_line_and_exit_status_2(tmp_path, capsys):
    status = exp3_sigmoid_cnn.main(["--steps", "0", "--output-dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert status == 2
    assert error.count("\n") == 1 and "--steps" in error and "0" in error


# ---------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------


def test_batch_sampler_draws_each_example_once_per_epoch_and_repeats_with_its_seed():
    sampler = harness.BatchSampler(num_examples=10, batch_size=3, seed=7)
    batches = sampler.take(6)  # two epochs of three full batches; one example per epoch dropped
    for epoch in (batches[:3], batches[3:]):
        assert len(np.unique(epoch)) == 9
    assert not np.array_equal(batches[:3], batches[3:])  # reshuffled each epoch
    np.testing.assert_array_equal(batches, harness.BatchSampler(10, 3, seed=7).take(6))


def test_a_shuffle_buffer_as_large_as_the_split_is_the_full_permutation():
    full = harness.BatchSampler(20, 4, seed=3).take(10)
    np.testing.assert_array_equal(
        harness.BatchSampler(20, 4, seed=3, shuffle_buffer=20).take(10), full
    )
    np.testing.assert_array_equal(
        harness.BatchSampler(20, 4, seed=3, shuffle_buffer=99).take(10), full
    )


def test_a_small_shuffle_buffer_shuffles_partially_like_tf_data():
    # tf.data's shuffle(buffer) reads the stored order into the buffer and outputs a random
    # slot each time: example i enters the buffer after i - buffer + 1 outputs, so it cannot
    # come out earlier; a buffer of one keeps the stored order.
    assert harness.BatchSampler(12, 4, seed=0, shuffle_buffer=1).take(3).ravel().tolist() == list(
        range(12)
    )
    buffer = 50
    sampler = harness.BatchSampler(1000, 10, seed=1, shuffle_buffer=buffer)
    for epoch in range(2):
        order = sampler.take(100).ravel()
        assert sorted(order.tolist()) == list(range(1000)), epoch  # each example once
        position = np.empty(1000, dtype=int)
        position[order] = np.arange(1000)
        assert np.all(position >= np.arange(1000) - buffer + 1)
        assert order[:100].max() < 150  # the stored order still shows: a partial shuffle
        assert not np.array_equal(order, np.arange(1000))


def test_a_recipe_run_is_configured_by_the_recipe_and_refuses_what_the_harness_lacks():
    config = harness.recipe_config(
        "paper_baseline", lr_multiplier=5, normalization="none", model_args={"min_depth": 8}
    )
    assert config.lr == pytest.approx(5 * RECIPES["paper_baseline"].values["lr"])
    assert config.model_args == {"dropout_rate": 0.4, "lrn": True, "min_depth": 8}
    assert config.normalization == "none" and config.weight_decay_form == "l2"
    with pytest.raises(ValueError, match="sets augment, label_smoothing, which the experiments"):
        harness.recipe_config("paper_baseline", augment=True, label_smoothing=0.1)


def test_trainer_follows_a_learning_rate_schedule_and_records_it():
    from bnzoo.optimization import WarmupSchedule

    data = _tiny_data()
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    schedule = WarmupSchedule(
        0.4,
        warmup_steps=0,
        total_steps=100,
        decay="exponential",
        decay_rate=0.5,
        staircase_steps=3,
    )
    optimizer = harness.sgd(1.0)
    trainer = harness.Trainer(
        model,
        data,
        data,
        optimizer=optimizer,
        batch_size=8,
        eval_every=4,
        seed=0,
        learning_rate_schedule=schedule,
    )
    run = trainer.train(7)
    assert run.steps == [0, 4, 7]
    # The rate of the next step at each point: halved every 3 steps.
    assert run.learning_rate == pytest.approx([0.4, 0.2, 0.1])
    # The optimizer's rate is the schedule's at its last step (step 6: 0.4 / 2**2).
    assert float(optimizer.learning_rate) == pytest.approx(0.1)


def test_steps_to_reach_is_the_first_evaluation_at_or_above_the_target():
    steps, accuracy = [0, 100, 200, 300], [0.1, 0.5, 0.8, 0.7]
    assert harness.steps_to_reach(steps, accuracy, 0.8) == 200
    assert harness.steps_to_reach(steps, accuracy, 0.75) == 200
    assert harness.steps_to_reach(steps, accuracy, 0.81) is None


def test_write_json_stores_non_finite_numbers_as_null(tmp_path):
    path = tmp_path / "out.json"
    harness.write_json(path, {"loss": float("nan"), "values": [1.5, float("inf")], "step": 3})
    assert _strict_json(path) == {"loss": None, "values": [1.5, None], "step": 3}


def _tiny_data(count=64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(count, 4, 4, 1)).astype("float32")
    labels = rng.integers(0, 3, count).astype("int32")
    return harness.ArraySplit(images, labels, None)


def test_trainer_stops_at_the_first_evaluation_after_the_weights_overflow():
    tiny = _tiny_data()
    # Inputs of 1e20 and a learning rate of 1e20 push the first update past float32's 3.4e38:
    # the weights become inf and every later loss NaN, the way a too-high learning rate ends.
    data = harness.ArraySplit(tiny.images * 1e20, tiny.labels, None)
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    run = harness.train(
        model,
        data,
        data,
        optimizer=harness.sgd(1e20),
        steps=20,
        batch_size=8,
        eval_every=5,
        seed=0,
    )
    assert run.diverged_at_step == 5
    assert run.steps == [0, 5]  # stopped instead of training 15 more steps


def test_trainer_is_resumable_and_evaluates_at_every_chunk_boundary():
    data = _tiny_data()
    inputs = keras.Input((4, 4, 1))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
    trainer = harness.Trainer(
        model,
        data,
        data,
        optimizer=harness.sgd(0.1),
        batch_size=8,
        eval_every=4,
        seed=0,
        record_step_losses=True,
    )
    trainer.train(6)
    run = trainer.train(3)
    assert run.steps == [0, 4, 6, 9]
    assert len(run.step_losses) == 9 and len(run.chunk_seconds) == 3
    loss, accuracy = harness.evaluate(model, data)
    assert run.eval_loss[-1] == pytest.approx(loss) and run.eval_accuracy[-1] == accuracy


def _bn_sigmoid_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4, 4, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(5, use_bias=False, name="dense")(x)
    x = keras.layers.BatchNormalization(momentum=0.5, name="bn")(x)
    x = keras.layers.Activation("sigmoid")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def test_gradient_probe_equals_gradient_tape_and_leaves_moving_statistics_alone():
    data = _tiny_data(32)
    model = _bn_sigmoid_model()
    probe = harness.gradient_norms_probe(model, data.images, data.labels, ["dense", "logits"])
    moving_before = [v.numpy() for v in model.non_trainable_variables]
    norms = probe(model)
    for before, variable in zip(moving_before, model.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(before, variable.numpy())

    with tf.GradientTape() as tape:
        logits = model(data.images, training=True)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(data.labels, logits, from_logits=True)
        )
    kernels = [model.get_layer("dense").kernel, model.get_layer("logits").kernel]
    expected = [float(tf.norm(g)) for g in tape.gradient(loss, kernels)]
    assert [norms["dense"], norms["logits"]] == pytest.approx(expected, rel=1e-5)


def test_percentile_probe_sees_the_batch_normalized_sigmoid_input_in_training_mode():
    data = _tiny_data(200)
    model = _bn_sigmoid_model()
    probe = harness.activation_percentiles_probe(model, "bn", data.images, (15, 50, 85), unit=2)
    measured = probe(model)

    # NumPy reference of Algorithm 1 with the batch's statistics (gamma 1, beta 0 at init).
    wu = data.images.reshape(200, -1) @ np.asarray(model.get_layer("dense").kernel)
    normalized = (wu - wu.mean(0)) / np.sqrt(wu.var(0) + model.get_layer("bn").epsilon)
    expected = np.percentile(normalized, (15, 50, 85), axis=0)
    np.testing.assert_allclose(measured["unit"], expected[:, 2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(measured["mean_over_units"], expected.mean(1), atol=1e-5)


def test_population_statistics_follow_algorithm_2_and_restore_the_moving_averages():
    data = _tiny_data(96)
    model = _bn_sigmoid_model()
    bn = model.get_layer("bn")
    population = harness.PopulationStatistics(model, data.images, batch_size=32)

    # Algorithm 2, step 10: average the batch means, and the batch variances times m / (m - 1).
    wu = data.images.reshape(3, 32, -1) @ model.get_layer("dense").kernel.numpy()
    expected_mean = wu.mean(axis=1).mean(axis=0)
    expected_variance = wu.var(axis=1, ddof=1).mean(axis=0)
    with population.applied():
        np.testing.assert_allclose(bn.moving_mean.numpy(), expected_mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(bn.moving_variance.numpy(), expected_variance, rtol=1e-4)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(5))
    np.testing.assert_array_equal(bn.moving_variance.numpy(), np.ones(5))


def test_trainer_evaluates_bn_networks_with_population_statistics_and_records_moving_averages():
    data = _tiny_data(96)
    model = _bn_sigmoid_model()
    trainer = harness.Trainer(
        model, data, data, optimizer=harness.sgd(0.5), batch_size=32, eval_every=3, seed=0
    )
    run = trainer.train(3)
    assert len(run.eval_accuracy_moving_averages) == len(run.eval_accuracy) == 2
    # Evaluated by hand: with population statistics in place, and with the moving averages.
    with trainer.population.applied():
        assert harness.evaluate(model, data)[1] == run.eval_accuracy[-1]
    assert harness.evaluate(model, data)[1] == run.eval_accuracy_moving_averages[-1]


def test_a_saved_config_repeats_the_run_and_flags_still_override_it(smoke_root):
    saved = smoke_root / "exp4_gradients" / "config.json"
    parser = harness.build_parser("exp4_gradients", "")
    repeated = harness.resolve_config(
        parser.parse_args(["--config", str(saved)]), exp4_gradients.PRESETS, "exp4_gradients"
    )
    saved_config = _strict_json(saved)
    assert {k: v for k, v in repeated.items() if k != "output_dir"} == {
        k: v for k, v in saved_config.items() if k != "output_dir"
    }
    # A repeat writes its own folder, never over the run it repeats.
    assert repeated["output_dir"] == str(harness.RESULTS_ROOT / "exp4_gradients")
    overridden = harness.resolve_config(
        parser.parse_args(["--config", str(saved), "--steps", "7", "--seed", "3"]),
        exp4_gradients.PRESETS,
        "exp4_gradients",
    )
    assert overridden["steps"] == 7 and overridden["seed"] == 3
    assert overridden["hidden_layers"] == repeated["hidden_layers"] == 3  # the smoke preset's


def test_the_published_configs_repeat_the_published_runs():
    for name, script in SCRIPTS.items():
        saved = report.PUBLISHED_ROOT / name / "config.json"
        parser = harness.build_parser(name, "")
        repeated = harness.resolve_config(
            parser.parse_args(["--config", str(saved)]), script.PRESETS, name
        )
        assert repeated["budget"] == "full" and repeated["experiment"] == name
        assert repeated["output_dir"] == str(harness.RESULTS_ROOT / name)


def test_a_config_of_another_experiment_is_refused(smoke_root):
    parser = harness.build_parser("exp3_sigmoid_cnn", "")
    args = parser.parse_args(["--config", str(smoke_root / "exp4_gradients" / "config.json")])
    with pytest.raises(ValueError, match="exp4_gradients"):
        harness.resolve_config(args, exp3_sigmoid_cnn.PRESETS, "exp3_sigmoid_cnn")


def test_run_all_runs_each_script_in_its_own_process_with_the_shared_options(tmp_path):
    from experiments import run_all

    args = run_all.build_parser().parse_args(
        ["--budget", "smoke", "--output-root", str(tmp_path), "--mnist-dir", "/data/mnist"]
    )
    exp1 = run_all.command("exp1_mnist_mlp", args)
    exp4 = run_all.command("exp4_gradients", args)
    assert exp1[1].endswith("experiments/exp1_mnist_mlp.py")
    assert exp1[exp1.index("--output-dir") + 1] == str(tmp_path / "exp1_mnist_mlp")
    assert exp1[exp1.index("--budget") + 1] == "smoke" and "--mnist-dir" in exp1
    assert "--mnist-dir" not in exp4  # only experiment 1 knows MNIST
