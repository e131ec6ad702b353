"""Renders docs/RESULTS.md from the experiments' ``results.json`` files.

The prose lives in ``experiments/RESULTS.template.md``; every number in the document comes from
a placeholder filled here from the JSON the scripts wrote, so the document cannot drift from
the measurements:

* ``{{exp1_mnist_mlp.sweep_table}}``: a Markdown snippet from that script's ``report(results)``;
* ``{{exp1_mnist_mlp.runtime}}``, ``{{exp1_mnist_mlp.budget}}``: the run's wall time and budget;
* ``{{runtime_table}}``, ``{{environment}}``: all scripts' runtimes; the machine;
* ``{{figure:exp1_mnist_mlp/fashion_mnist_figure1a_accuracy.png}}``: a link to that plot.

An experiment that has not been run renders as a note saying which command produces it.

The published numbers are in the repository: ``--update-docs`` copies each experiment's
``results.json``, ``config.json`` and the plots the document shows into
``docs/results/<experiment>/`` (the layout of ``experiments/results/``, which is git-ignored),
then renders docs/RESULTS.md from that copy alone, so anyone can check every table against the
committed JSON (``tests/test_experiments.py`` does) or re-render it after editing the template.

    .venv/bin/python experiments/report.py                    # -> experiments/results/RESULTS.md
    .venv/bin/python experiments/report.py --update-docs      # -> docs/results/, docs/RESULTS.md
    .venv/bin/python experiments/report.py --update-docs --results-root docs/results  # re-render
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

EXPERIMENTS = (
    "exp1_mnist_mlp",
    "exp2_learning_rates",
    "exp2_diagnostics",
    "exp3_sigmoid_cnn",
    "exp4_gradients",
    "exp5_layer_vs_keras",
)
TEMPLATE = Path(__file__).with_name("RESULTS.template.md")
RESULTS_ROOT = REPO_ROOT / "experiments" / "results"
DOCS = REPO_ROOT / "docs"
PUBLISHED_ROOT = DOCS / "results"
PUBLISHED_FILES = ("results.json", "config.json")
PLACEHOLDER = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")


def load_results(results_root: Path) -> dict[str, dict]:
    """``name -> results.json`` for every experiment that has been run under ``results_root``."""
    found = {}
    for name in EXPERIMENTS:
        path = results_root / name / "results.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


def _format_seconds(value: float) -> str:
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def build_context(results: dict[str, dict]) -> dict[str, str]:
    """Every placeholder's text except figures: each script's ``report()`` plus run facts."""
    context = {}
    for name, data in results.items():
        module = importlib.import_module(f"experiments.{name}")
        for key, text in module.report(data).items():
            context[f"{name}.{key}"] = text
        context[f"{name}.runtime"] = _format_seconds(data["runtime_seconds"])
        context[f"{name}.budget"] = data["budget"]
    rows = []
    for name in EXPERIMENTS:
        if name in results:
            data = results[name]
            load = data["environment"].get("load_average_1_5_15_min")
            load_text = " / ".join(f"{v:.1f}" for v in load) if load else "not recorded"
            cpu = data["environment"].get("cpu", "not recorded").removeprefix("CPU: ")
            rows.append(
                f"| `experiments/{name}.py` | {data['budget']} | "
                f"{_format_seconds(data['runtime_seconds'])} | {load_text} | {cpu} |"
            )
    if rows:
        total = sum(results[name]["runtime_seconds"] for name in results)
        rows.append(f"| all | | {_format_seconds(total)} | | |")
    context["runtime_table"] = "\n".join(
        [
            "| script | budget | runtime | load average at the end (1 / 5 / 15 min) | CPU |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    if results:
        env = next(iter(results.values()))["environment"]
        gpus = "no GPU" if env["gpus"] == 0 else f"{env['gpus']} GPU(s)"
        context["environment"] = (
            f"{env['cpu_count']}-core CPU ({env['machine']}), {gpus}; Python {env['python']}, "
            f"TensorFlow {env['tensorflow']}, Keras {env['keras']}"
        )
        context["timing_conditions"] = timing_conditions(results)
    return context


# Above this many runnable jobs per core (the load average over the cores) the scripts competed
# for the CPU, and their wall times say more about the machine's load than about the code.
CONTENTION_LOAD_PER_CORE = 1.25


def timing_conditions(results: dict[str, dict]) -> str:
    """One sentence on the CPU load the wall times were measured under, from the JSON."""
    loads = [
        max(data["environment"]["load_average_1_5_15_min"])
        for data in results.values()
        if data["environment"].get("load_average_1_5_15_min")
    ]
    if not loads:
        return "The load on the machine was not recorded, so the times may include other jobs'."
    cores = next(iter(results.values()))["environment"]["cpu_count"]
    peak = max(loads)
    if peak / cores > CONTENTION_LOAD_PER_CORE:
        return (
            f"**The times below were measured under contention**: other jobs shared the machine "
            f"(load average up to {peak:.1f} on {cores} cores, last column), so every wall time "
            "in this document (runtimes, the training-time columns, experiment 5's epoch times) "
            "is an upper bound, and ratios of times are noisy; accuracies and losses do not "
            "depend on the load."
        )
    return (
        f"The machine was quiet while they ran (load average at most {peak:.1f} on {cores} "
        "cores), so the times are representative of it."
    )


def figures(template: str) -> list[str]:
    """The plots ``template`` shows, as ``<experiment>/<file>.png``."""
    keys = (match.group(1) for match in PLACEHOLDER.finditer(template))
    return [key.removeprefix("figure:") for key in keys if key.startswith("figure:")]


def render(template: str, results: dict[str, dict], figures_root: Path, figures_link: str) -> str:
    """Fills ``template``'s placeholders.

    Args:
        template: the Markdown template.
        results: ``load_results(...)``: experiment name -> its results.json.
        figures_root: the folder holding ``<experiment>/<plot>.png``.
        figures_link: how the rendered document links to ``figures_root`` (relative path).

    Raises:
        ValueError: a placeholder names something no run of that experiment produces, or a
            plot of an experiment that ran is missing from ``figures_root``.
    """
    context = build_context(results)

    def replace(match: re.Match) -> str:
        key = match.group(1)
        if key.startswith("figure:"):
            relative = key.removeprefix("figure:")
            experiment = relative.split("/", 1)[0]
            if experiment not in results:
                return _not_run(experiment)
            if not (figures_root / relative).is_file():
                raise ValueError(
                    f"Template figure {relative!r} is not in {figures_root}: run {experiment} "
                    "again (its plots are written next to its results.json)."
                )
            return f"![{Path(relative).stem.replace('_', ' ')}]({figures_link}/{relative})"
        if key in context:
            return context[key]
        experiment = key.split(".", 1)[0]
        if experiment in EXPERIMENTS and experiment not in results:
            return _not_run(experiment)
        raise ValueError(
            f"Template placeholder {{{{{key}}}}} is unknown; known: {sorted(context)} and "
            "figure:<experiment>/<file>.png."
        )

    return PLACEHOLDER.sub(replace, template)


def _not_run(experiment: str) -> str:
    return f"_(not run yet: `.venv/bin/python experiments/{experiment}.py`)_"


def publish(results_root: Path, published_root: Path, template: str) -> list[str]:
    """Copies each run's JSON and the plots ``template`` shows into ``published_root``.

    Each experiment run under ``results_root`` replaces its whole folder in ``published_root``
    (so no stale plot survives); experiments not run there keep their published folder.
    Returns the experiments published.
    """
    if results_root.resolve() == published_root.resolve():
        return []
    shown = figures(template)
    published = []
    for name in load_results(results_root):
        source, target = results_root / name, published_root / name
        files = [f for f in PUBLISHED_FILES if (source / f).is_file()]
        files += [f.split("/", 1)[1] for f in shown if f.startswith(f"{name}/")]
        missing = [f for f in files if not (source / f).is_file()]
        if missing:
            raise ValueError(f"{source} lacks {missing}: run {name} again.")
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for file in files:
            shutil.copyfile(source / file, target / file)
        _relative_output_dir(target / "config.json")
        published.append(name)
    return published


def _relative_output_dir(config_path: Path) -> None:
    """A published config names its run folder relative to the repository, not this machine."""
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    output_dir = Path(config.get("output_dir") or ".")
    if output_dir.is_absolute() and output_dir.is_relative_to(REPO_ROOT):
        config["output_dir"] = str(output_dir.relative_to(REPO_ROOT))
        config_path.write_text(json.dumps(config, indent=1) + "\n")


def write_report(results_root: Path, update_docs: bool) -> Path:
    """Renders the template: into ``results_root``, or with ``update_docs`` into docs/.

    With ``update_docs`` the runs under ``results_root`` are published first, and the document
    is rendered from everything published, so a partial run updates its own sections only.
    """
    template = TEMPLATE.read_text()
    if update_docs:
        publish(results_root, PUBLISHED_ROOT, template)
        root, output, link = PUBLISHED_ROOT, DOCS / "RESULTS.md", "results"
    else:
        root, output, link = results_root, results_root / "RESULTS.md", "."
    text = render(template, load_results(root), root, link)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-root", type=Path, default=RESULTS_ROOT)
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="copy the runs' JSON and plots to docs/results/ and render docs/RESULTS.md from it",
    )
    args = parser.parse_args(argv)
    try:
        output = write_report(args.results_root, args.update_docs)
    except (ValueError, FileNotFoundError) as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    print(f"report: wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
