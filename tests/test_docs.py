"""The documentation stays true: links resolve, what it names exists, the README's first screen
stays an entry point, its Keras snippet runs, and each figure of record is stated once.

What is checked is what drifts silently: a renamed module or test, a moved heading, a number
copied into a second page and then updated in only one of them.
"""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

#: The README's first screen: these sections, in this order, and nothing else.
FIRST_SCREEN = ["Install", "Train and test", "In your own Keras code", "Documentation"]
FIRST_SCREEN_LINES = 60
#: What follows it: one line per further `make` target, and where the figures are.
AFTER_FIRST_SCREEN = ["More commands", "Measured"]
MORE_COMMANDS = ["setup", "bench", "lint", "test-all", "experiments"]
CPUS = ["Xeon AMX", "EPYC AVX-512", "EPYC Zen 1"]
#: Git-ignored folders the project writes into: a path there names an output, not a file.
OUTPUT_FOLDERS = ("experiments/results/", "bench/results/", "runs/")

#: Figures of record (docs/measurements.md): each stated in exactly one page, the others link
#: to it. A number copied into a second page is the one that goes stale.
FIGURES_OF_RECORD = [
    "93.18 %",  # make train, test accuracy (bfloat16)
    "93.09 %",  # the same run in float32
    "15.44 T",  # make train's training compute
    "8 min 40 s",  # make train under load
    "12 min 37 s",  # the float32 run under load
    "93.28 %",  # plain_cnn, 10 epochs
    "7 min 7 s",  # its wall time
    "47.1 T",  # its training compute
    "0.38×",  # the layer against Keras', EPYC AVX-512
    "0.84×",  # the same on EPYC Zen 1
    "+17.2 %",  # Keras' BN in BN-Inception's training step
    "6 min 35 s",  # make bench
    "0.182 ms",  # TFLite int8 latency
    "93.34 %",  # TFLite int8 accuracy
    "3 min 43 s",  # make train, quiet, Xeon AMX
    "0.40×",  # the layer against Keras', Xeon AMX
    "+7.4 %",  # our BN in BN-Inception's training step, Xeon AMX
    "6 min 0 s",  # make bench, Xeon AMX
    "0.097 ms",  # TFLite int8 latency of the default run, Xeon AMX
]


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of each Markdown heading outside fenced code blocks."""
    found, fenced = [], False
    for index, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) (.+)", line)):
            found.append((index, len(match.group(1)), match.group(2).strip()))
    return found


def anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, _, title in headings(page.read_text(encoding="utf-8")):
        slug = anchor(title)
        result.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return result


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced code block."""
    blocks, current, language = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                blocks.append((language, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def first_screen() -> tuple[str, str]:
    """The README before its first section beyond FIRST_SCREEN, and the rest."""
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    end = next(
        (i for i, level, title in headings(text) if level == 2 and title not in FIRST_SCREEN),
        len(lines),
    )
    return "\n".join(lines[:end]), "\n".join(lines[end:])


def test_readme_first_screen_is_install_the_two_commands_a_snippet_and_links():
    screen, _ = first_screen()
    assert len(screen.splitlines()) <= FIRST_SCREEN_LINES, (
        f"README's first screen is {len(screen.splitlines())} lines; keep it within "
        f"{FIRST_SCREEN_LINES} (install, make train/test, the Keras snippet, links) and move "
        "the rest into docs/"
    )
    sections = [title for _, level, title in headings(screen) if level == 2]
    assert sections == FIRST_SCREEN
    shell = [
        line.split("#")[0].strip()
        for language, lines in code_blocks(screen)
        if language == "bash"
        for line in lines
    ]
    assert [command.split(" ")[0:2] for command in shell] == [
        ["git", "clone"],
        ["make", "setup"],
        ["pip", "install"],
        ["make", "train"],
        ["make", "test"],
    ]
    snippets = [lines for language, lines in code_blocks(screen) if language == "python"]
    assert len(snippets) == 1 and len(snippets[0]) <= 6, "one Keras snippet of at most 6 lines"
    assert "from models import create_model" in "\n".join(snippets[0])
    assert "from layers import BatchNormalization" in "\n".join(snippets[0])
    # Measured figures live in docs/measurements.md, each with its CPU.
    prose = re.sub(r"```.*?```", "", screen, flags=re.S)
    figures = re.findall(r"\d+(?:[.,]\d+)?\s?(?:%|ms|min|s\b|×|x\b|GiB|MB)", prose)
    assert not figures, f"measured figures in README's first screen: {figures}"


def test_readme_after_its_first_screen_holds_the_other_make_targets_and_what_was_measured():
    _, rest = first_screen()
    assert [title for _, level, title in headings(rest) if level == 2] == AFTER_FIRST_SCREEN
    commands = rest.split("## Measured")[0]
    bullets = re.findall(r"^- `make ([\w-]+)`", commands, flags=re.M)
    assert bullets == MORE_COMMANDS
    measured = rest.split("## Measured")[1]
    for cpu in CPUS:  # what `make test` takes, per CPU
        assert re.search(rf"^\| {re.escape(cpu)} \|", measured, flags=re.M), cpu
        assert cpu in (ROOT / "docs" / "measurements.md").read_text(encoding="utf-8"), cpu


def test_readme_keras_snippet_runs():
    # TensorFlow only: JAX infers every layer's output by tracing it, which makes building
    # BN-Inception slow there; the builders on other backends are the model tests' job.
    screen, _ = first_screen()
    (snippet,) = [lines for language, lines in code_blocks(screen) if language == "python"]
    namespace: dict = {}
    exec("\n".join(snippet), namespace)  # noqa: S102 (the README's own code)
    assert namespace["model"].count_params() > 0
    assert type(namespace["block"].layers[1]).__name__ == "BatchNormalization"


@pytest.mark.parametrize("figure", FIGURES_OF_RECORD)
def test_each_figure_of_record_is_stated_in_one_page(figure):
    pages = [page.name for page in PAGES if figure in page.read_text(encoding="utf-8")]
    assert pages == ["measurements.md"], (
        f"{figure!r} appears in {pages}: state it in docs/measurements.md and link there"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_and_anchors_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans: `f(images=...)` is no link
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(target)
    assert not broken, f"{page.name}: links that lead nowhere: {broken}"


def _mentions(pattern: str) -> list[tuple[str, str]]:
    """(page, match) for every match of `pattern` in the README and docs/."""
    found = set()
    for page in PAGES:
        found.update((page.name, match) for match in re.findall(pattern, page.read_text("utf-8")))
    return sorted(found)


def test_files_the_docs_mention_exist():
    folders = r"(?:bnzoo|layers|models|bench|tools|tests|experiments|\.ci)"
    missing = [
        (page, path)
        for page, path in _mentions(rf"(?<![\w/.~-])({folders}/[\w./<>*-]*[\w*>])")
        if not set("<>*") & set(path)  # placeholders and globs
        and not path.startswith(OUTPUT_FOLDERS)
        and not (ROOT / path.split("::")[0]).exists()
    ]
    assert not missing, f"files named in the docs that do not exist: {missing}"


def test_tests_the_docs_name_exist():
    missing = [
        (page, f"{path}::{name}")
        for page, (path, name) in _mentions(r"(tests/\w+\.py)::(\w+)")
        if not re.search(rf"(def|class) {name}\b", (ROOT / path).read_text())
    ]
    assert not missing, f"tests named in the docs that do not exist: {missing}"


def test_python_names_the_docs_mention_exist():
    missing = []
    for page, dotted in _mentions(r"`((?:bnzoo|layers|models)\.[\w.]*\w)"):
        if dotted.endswith(".py"):
            continue
        parts = dotted.split(".")
        for split in range(len(parts), 0, -1):
            try:
                found = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            for attribute in parts[split:]:
                found = getattr(found, attribute, None)
            break
        else:
            found = None
        if found is None:
            missing.append((page, dotted))
    assert not missing, f"modules, classes or functions the docs name that do not exist: {missing}"
