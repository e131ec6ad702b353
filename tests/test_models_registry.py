"""The registry: names, wildcards, variant defaults, user overrides, helpful errors."""

import dataclasses

import pytest

import models
from models import __main__ as models_cli
from models import registry

TINY_INCEPTION = dict(input_shape=(32, 32, 3), width_multiplier=0.25, min_depth=4, classes=3)


def test_list_models_is_sorted_and_filters_with_fnmatch_wildcards():
    names = models.list_models()
    assert names == sorted(names)
    assert {"bn_inception", "bn_inception_slim", "plain_cnn", "paper_mlp"} <= set(names)
    assert models.list_models("bn_inception*") == ["bn_inception", "bn_inception_slim"]
    assert models.list_models("*_mlp") == ["paper_mlp"]
    assert models.list_models("plain_cn?") == ["plain_cnn"]
    assert models.list_models("alexnet*") == []


def test_builders_are_importable_from_the_package():
    from models import bn_inception, paper_mlp, plain_cnn

    assert models.get_model_spec("bn_inception").builder is bn_inception
    assert models.get_model_spec("bn_inception_slim").builder is bn_inception
    assert models.get_model_spec("plain_cnn").builder is plain_cnn
    assert models.get_model_spec("paper_mlp").builder is paper_mlp


def test_model_spec_is_frozen_and_describes_the_input():
    spec = models.get_model_spec("bn_inception")
    assert spec.name == "bn_inception"
    assert spec.default_input_shape == (224, 224, 3)
    assert spec.min_input_size == 32
    assert spec.description
    assert models.get_model_spec("plain_cnn").default_input_shape == (28, 28, 1)
    assert models.get_model_spec("paper_mlp").default_input_shape == (28, 28, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.min_input_size = 1
    with pytest.raises(TypeError):
        models.get_model_spec("bn_inception_slim").default_kwargs["stem"] = "conv"


def test_create_model_applies_the_variant_defaults_then_the_user_overrides():
    slim = models.create_model("bn_inception_slim", **TINY_INCEPTION)
    assert slim.name == "bn_inception_slim"
    # 4c at width 0.25: 1×1 40, 3×3 40, double 3×3 40, pool projection 96 → 24 (slim) or 32.
    assert slim.get_layer("inception_4c_output").output.shape[-1] == 40 + 40 + 40 + 24
    assert slim.get_layer("dropout").rate == pytest.approx(0.2)

    overridden = models.create_model(
        "bn_inception_slim", module_table="caffe", dropout_rate=0.0, **TINY_INCEPTION
    )
    assert overridden.get_layer("inception_4c_output").output.shape[-1] == 40 + 40 + 40 + 32
    assert "dropout" not in {layer.name for layer in overridden.layers}
    assert overridden.output.shape == (None, 3)


def test_create_model_names_the_model_after_the_entry_unless_told_otherwise():
    assert models.create_model("paper_mlp").name == "paper_mlp"
    assert models.create_model("paper_mlp", model_name="mlp_run_3").name == "mlp_run_3"


def test_unknown_model_names_raise_value_error_listing_close_matches():
    with pytest.raises(ValueError, match="Unknown model 'bn_incepton'.*bn_inception"):
        models.create_model("bn_incepton")
    with pytest.raises(ValueError, match="Did you mean: plain_cnn"):
        models.get_model_spec("plain-cnn")
    with pytest.raises(ValueError, match="Registered models: .*paper_mlp"):
        models.create_model("alexnet")


def test_register_model_decorator_registers_variants_and_refuses_to_overwrite(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @models.register_model(default_input_shape=(8, 8, 1), min_input_size=2, widths=(4,))
    def toy_cnn(**kwargs):
        """A toy builder."""
        return models.plain_cnn(**kwargs)

    models.register_model(
        "toy_cnn_wide", default_input_shape=(8, 8, 1), min_input_size=2, widths=(4, 8)
    )(toy_cnn)

    assert models.list_models("toy_*") == ["toy_cnn", "toy_cnn_wide"]
    assert models.get_model_spec("toy_cnn").description == "A toy builder."
    model = models.create_model("toy_cnn_wide", input_shape=(8, 8, 1))
    assert model.name == "toy_cnn_wide"
    assert model.get_layer("stage2_conv1").filters == 8

    with pytest.raises(ValueError, match="already registered"):
        models.register_model("plain_cnn", default_input_shape=(8, 8, 1), min_input_size=1)(toy_cnn)


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_builds_at_its_min_input_size_and_rejects_smaller(name):
    spec = models.get_model_spec(name)
    channels = spec.default_input_shape[-1]
    smallest = (spec.min_input_size, spec.min_input_size, channels)
    model = models.create_model(name, input_shape=smallest, classes=2)
    assert model.output.shape == (None, 2)
    with pytest.raises(ValueError, match="input_shape"):
        models.create_model(name, input_shape=(spec.min_input_size - 1, 64, channels))


def test_command_line_lists_models_with_parameters_multiply_adds_input_size_and_weights(capsys):
    assert models_cli.main(["*_mlp"]) == 0
    table = capsys.readouterr().out
    header, rule, row = table.splitlines()
    assert header.split()[:6] == [
        "model",
        "parameters",
        "trainable",
        "multiply-adds",
        "input",
        "weights",
    ]
    assert row.split()[:7] == ["paper_mlp", "100,610", "100,010", "99.40", "k", "28x28x1", "-"]


def test_command_line_lists_the_pretrained_weight_sets(capsys):
    assert models_cli.main(["--weights"]) == 0
    rows = {tuple(line.split()[:4]) for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows == {
        ("bn_inception", "imagenet", "73.52", "91.56"),
        ("bn_inception_slim", "imagenet", "73.90", "91.80"),
        ("inception_v3", "imagenet", "77.90", "93.70"),
        ("resnet101", "imagenet", "76.40", "92.80"),
        ("resnet152", "imagenet", "76.60", "93.10"),
        ("resnet50", "imagenet", "74.90", "92.10"),
    }


def test_command_line_summarizes_one_model_and_applies_options(capsys):
    assert (
        models_cli.main(["plain_cnn", "--input-shape", "32,32,3", "--normalization", "none"]) == 0
    )
    text = capsys.readouterr().out
    assert "stage1_conv1 (Conv2D)" in text and "_bn" not in text
    assert "input shape:      32x32x3 (default 28x28x1, minimum 4x4)" in text
    expected = models.profile_model(models.plain_cnn(input_shape=(32, 32, 3), normalization=None))
    assert f"multiply-adds:    {expected.multiply_adds:,}" in text


def test_command_line_reports_bad_arguments_in_one_line_with_status_2(capsys):
    for argv, message in [
        (["bn_incepton"], "Did you mean: bn_inception"),
        (["plain_cnn", "--input-shape", "2,2,1"], "at least 4x4"),
        (["alexnet*"], "no model matches 'alexnet*'"),
        (["--normalization", "group"], "invalid choice: 'group'"),
    ]:
        assert models_cli.run(argv) == 2, argv
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error


def run_models_cli(*args, import_times=False):
    """The real `python -m models ARGS` in a fresh process, as a user types it."""
    import os
    import pathlib
    import subprocess
    import sys

    repository = pathlib.Path(__file__).resolve().parent.parent
    environment = {**os.environ, "PYTHONPATH": str(repository)}
    environment.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the CLI must silence TensorFlow itself
    flags = ["-X", "importtime"] if import_times else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "models", *args],
        cwd=repository,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_command_line_help_answers_without_importing_tensorflow():
    # -X importtime lists every module the process imports, on stderr.
    result = run_models_cli("--help", import_times=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: python -m models" in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert "models.__main__" in imported or "models" in imported
    assert not {name for name in imported if name.split(".")[0] in ("tensorflow", "keras")}


def test_command_line_prints_no_tensorflow_logging():
    result = run_models_cli("paper_mlp")
    assert result.returncode == 0
    assert "hidden_1_dense" in result.stdout
    assert result.stderr == "", result.stderr


def test_reloading_a_builder_module_re_registers_it(monkeypatch):
    import importlib
    import sys

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    # sys.modules, because the package attribute `models.paper_mlp` is the builder function.
    reloaded = importlib.reload(sys.modules["models.paper_mlp"])
    assert models.get_model_spec("paper_mlp").builder is reloaded.paper_mlp


LOAD_WITH_LAYERS_AND_MODELS_ONLY = """
import sys

import keras
import layers
import models

for path in sys.argv[1:]:
    model = keras.saving.load_model(path)
    print(sorted({type(layer).__name__ for layer in model.layers}))
"""


def test_keras_files_with_the_builders_own_layers_load_after_importing_layers_and_models(
    tmp_path,
):
    """GoogLeNet's LRN and the weights' preprocessing are Keras layers of `models`: a user's
    script that imports only `keras`, `layers` and `models` must load files that hold them."""
    import os
    import subprocess
    import sys

    import keras

    from models.preprocessing import ImagePreprocessing

    googlenet = models.inception_v1(include_top=False, input_shape=(32, 32, 3), pooling="avg")
    preprocessing = keras.Sequential([keras.Input((8, 8, 3)), ImagePreprocessing("caffe")])
    paths = [str(tmp_path / "googlenet.keras"), str(tmp_path / "preprocessing.keras")]
    googlenet.save(paths[0])
    preprocessing.save(paths[1])
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_LAYERS_AND_MODELS_ONLY, *paths],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LocalResponseNormalization" in result.stdout
    assert "ImagePreprocessing" in result.stdout
