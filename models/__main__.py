"""`python -m models`: what the zoo holds and what each model costs.

```
python -m models                          # every model: parameters, multiply-adds, input size
python -m models "bn_inception*"          # only the names matching a wildcard
python -m models bn_inception             # one model's layer-by-layer summary and totals
python -m models plain_cnn --input-shape 32,32,3 --classes 100 --normalization none
```
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape; write height,width,channels, e.g. 32,32,3"
        )
    return shape


def _format_count(count: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return str(count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models",
        description="List bnzoo's models with their parameters and multiply-adds, or "
        "summarize one model.",
    )
    parser.add_argument(
        "name",
        nargs="?",
        default="*",
        help="a model name (prints its summary) or an fnmatch wildcard (lists the matches); "
        "default: every model",
    )
    parser.add_argument(
        "--input-shape",
        type=_parse_input_shape,
        help="height,width,channels to build at (default: the model's default input shape)",
    )
    parser.add_argument("--classes", type=int, help="number of classes of the classifier")
    parser.add_argument(
        "--normalization",
        choices=["batch_norm", "keras", "none"],
        help="the normalization switch (default: the model's, batch_norm)",
    )
    return parser


def _builder_arguments(args: argparse.Namespace) -> dict:
    arguments = {}
    if args.input_shape is not None:
        arguments["input_shape"] = args.input_shape
    if args.classes is not None:
        arguments["classes"] = args.classes
    if args.normalization is not None:
        arguments["normalization"] = args.normalization
    return arguments


def list_table(names: Sequence[str], arguments: dict) -> str:
    """The table `python -m models` prints: one row per model."""
    import models

    header = ("model", "parameters", "trainable", "multiply-adds", "input", "description")
    rows = []
    for name in names:
        spec = models.get_model_spec(name)
        profile = models.profile_model(models.create_model(name, **arguments))
        rows.append(
            (
                name,
                f"{profile.parameters:,}",
                f"{profile.trainable_parameters:,}",
                _format_count(profile.multiply_adds),
                "x".join(str(size) for size in profile.input_shape),
                spec.description,
            )
        )
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.ljust(width) if column in (0, 4, 5) else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def summary_text(name: str, arguments: dict) -> str:
    """The text `python -m models NAME` prints: Keras' summary, then the totals."""
    import models

    spec = models.get_model_spec(name)
    model = models.create_model(name, **arguments)
    profile = models.profile_model(model)
    lines = []
    model.summary(print_fn=lambda line, **_: lines.append(line), line_length=110)
    lines += [
        "",
        f"{name}: {spec.description}",
        f"input shape:      {'x'.join(str(size) for size in profile.input_shape)} "
        f"(default {'x'.join(str(size) for size in spec.default_input_shape)}, "
        f"minimum {spec.min_input_size}x{spec.min_input_size})",
        f"parameters:       {profile.parameters:,} ({profile.trainable_parameters:,} trainable)",
        f"multiply-adds:    {profile.multiply_adds:,} ({_format_count(profile.multiply_adds)})"
        " per example",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import models

    arguments = _builder_arguments(args)
    try:
        if any(character in args.name for character in "*?["):
            names = models.list_models(args.name)
            if not names:
                raise ValueError(
                    f"no model matches {args.name!r}; registered: {', '.join(models.list_models())}"
                )
            print(list_table(names, arguments))
        else:
            print(summary_text(args.name, arguments))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
