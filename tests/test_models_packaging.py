"""The package boundary: `layers` <- `models` <- `bnzoo`, and a collision-free import path.

`import models` must not pull in the trainer (`bnzoo`). Installed, bnzoo's top-level `layers`
and `models` are shadowed by a user's own `layers.py` / `models.py`; `bnzoo.layers` and
`bnzoo.models` reach bnzoo's anyway, with one module object per file (`bnzoo/library_packages.py`),
and bnzoo's trainer, which imports them by those names, trains and evaluates there too.
"""

import ast
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

import layers
import models

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent


def run_python(code, *args, cwd=REPOSITORY, python=sys.executable, env=None):
    return subprocess.run(
        [python, "-c", code, *args],
        cwd=cwd,
        env=env or {**os.environ, "PYTHONPATH": str(REPOSITORY), "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_import_models_loads_no_bnzoo_module():
    result = run_python(
        "import sys, models, layers\n"
        "models.list_models()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'bnzoo'))"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("package", ["layers", "models"])
def test_library_code_imports_its_own_package_relatively_and_never_bnzoo(package):
    """An absolute `import layers`/`models` inside the libraries would reach a user's module
    of that name; `bnzoo` would break the layering (the import-linter contract checks that
    too, but not the form of an import)."""
    offenders = []
    for path in sorted((REPOSITORY / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            top = {name.split(".")[0] for name in names}
            if top & {"layers", "models", "bnzoo"}:
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders


def test_bnzoo_models_is_the_models_package_when_nothing_shadows_it():
    import bnzoo.layers
    import bnzoo.models

    assert bnzoo.models is models and bnzoo.layers is layers
    assert bnzoo.models.create_model is models.create_model
    assert bnzoo.layers.BatchNormalization is layers.BatchNormalization
    # Submodules through the alias are the same module objects, not second copies.
    assert importlib.import_module("bnzoo.models.registry") is sys.modules["models.registry"]
    preprocessing = importlib.import_module("bnzoo.models.preprocessing")
    assert preprocessing.ImagePreprocessing is models.ImagePreprocessing
    # ... and keep their own identity (pickle and importlib.reload rely on it).
    assert preprocessing.__spec__.name == "models.preprocessing"


USER_MODULE = "WHO = 'the user project'\n"

INSTALLED_USE = """
import json, os, sys

import keras
import numpy as np

import layers, models  # the user project's own modules
from bnzoo.layers import BatchNormalization
from bnzoo.models import create_model

site, theirs, ours = sys.argv[1:4]
assert models.WHO == layers.WHO == "the user project"
model = create_model("plain_cnn", input_shape=(8, 8, 1), widths=(4,), classes=3)
assert isinstance(model.get_layer("stage1_conv1_bn"), BatchNormalization)
model.save(ours)
loaded = keras.saving.load_model(theirs)
bn = loaded.get_layer("stage1_conv1_bn")
assert type(bn) is BatchNormalization, type(bn)
assert sys.modules["models"].WHO == "the user project"  # still theirs after all that
files = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
bnzoo_files = [f for f in files if f.startswith(site)]
print(json.dumps({
    "from_site": sorted({os.path.relpath(f, site).split(os.sep)[0] for f in bnzoo_files}),
    "twice": len(bnzoo_files) - len(set(bnzoo_files)),
    "moving_variance": np.asarray(bn.moving_variance).tolist(),
}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install` (not editable) into a fresh environment, and a project folder whose own
    `models.py` and `layers.py` shadow the top-level packages. Returns (python, site, project)."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    for name in ("layers", "models", "bnzoo"):
        shutil.copytree(
            REPOSITORY / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source / name)
    environment = root / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run(
        [base_python, "-m", "venv", "--without-pip", environment], check=True, timeout=120
    )
    python = environment / "bin" / "python"
    site = pathlib.Path(
        run_python(
            "import sysconfig; print(sysconfig.get_path('purelib'))", python=python
        ).stdout.strip()
    )
    # TensorFlow, Keras and the rest come from this environment, without its editable bnzoo
    # (a .pth line adds a folder, not the .pth files in it).
    dependencies = next(p for p in sys.path if p.endswith("site-packages"))
    (site / "dependencies.pth").write_text(dependencies + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    assert {"bnzoo", "layers", "models"} <= {p.name for p in site.iterdir()}

    project = root / "project"
    project.mkdir()
    (project / "models.py").write_text(USER_MODULE)
    (project / "layers.py").write_text(USER_MODULE)
    return python, site, project


def run_in_project(installed, script, *args):
    """`script` run as the user project's own file, with the installed bnzoo."""
    python, site, project = installed
    (project / "use_bnzoo.py").write_text(script)
    result = subprocess.run(
        [python, "use_bnzoo.py", str(site), *map(str, args)],
        cwd=project,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_installed_package_works_beside_a_users_own_models_and_layers(installed, tmp_path):
    """bnzoo through `bnzoo.models` and `bnzoo.layers` from a project whose `models.py` and
    `layers.py` shadow the top-level packages; `.keras` files written either way load the
    other way."""
    theirs = models.plain_cnn(input_shape=(8, 8, 1), widths=(4,), classes=3)
    theirs.get_layer("stage1_conv1_bn").moving_variance.assign(np.full(4, 2.5, "float32"))
    theirs.save(tmp_path / "theirs.keras")
    ours = tmp_path / "ours.keras"
    report = run_in_project(installed, INSTALLED_USE, tmp_path / "theirs.keras", ours)
    assert report["from_site"] == ["bnzoo", "layers", "models"]  # the installed copy, once
    assert report["twice"] == 0
    assert report["moving_variance"] == [2.5] * 4

    restored = keras.saving.load_model(ours)
    assert isinstance(restored.get_layer("stage1_conv1_bn"), layers.BatchNormalization)


INSTALLED_TRAINER = """
import json, os, sys

import layers, models  # the user project's own modules
from bnzoo.config import TrainConfig
from bnzoo.evaluation import evaluate_path
from bnzoo.training import train

site, run_dir = sys.argv[1:3]
train(TrainConfig(
    model="plain_cnn", model_args={"widths": [4]}, train_split="train[:64]", val_split=None,
    test_split=None, epochs=1, batch_size=32, mixed_precision=False, output_dir=run_dir,
))
# Scored through model.keras (loading it registers bnzoo's layers) after Algorithm 2 over it.
metrics = evaluate_path(
    run_dir, split="test[:64]", bn_statistics_split="train[:64]", bn_statistics_batches=1
)
files = [getattr(m, "__file__", None) or "" for m in list(sys.modules.values())]
print(json.dumps({
    "user_modules": [models.WHO, layers.WHO, sys.modules["models"].WHO],
    "from_site": sorted({
        os.path.relpath(f, site).split(os.sep)[0] for f in files if f.startswith(site)
    }),
    "examples": metrics["num_examples"],
    "accuracy": metrics["accuracy"],
}))
"""


@pytest.mark.slow
def test_the_installed_trainer_uses_bnzoos_libraries_beside_a_users_own(installed, tmp_path):
    """bnzoo's own modules reach the libraries as `bnzoo.models`/`bnzoo.layers`: a bare
    `import models` in the trainer would get the project's models.py (and fail, or worse)."""
    run_dir = tmp_path / "run"
    report = run_in_project(installed, INSTALLED_TRAINER, run_dir)
    assert report["user_modules"] == ["the user project"] * 3
    assert report["from_site"] == ["bnzoo", "layers", "models"]
    assert report["examples"] == 64
    assert 0.0 <= report["accuracy"] <= 1.0
    assert (run_dir / "model.keras").is_file() and (run_dir / "saved_model").is_dir()
