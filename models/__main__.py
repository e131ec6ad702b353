"""`python -m models`: what the zoo holds, what each model costs, which weights it has.

```
python -m models                          # every model: parameters, multiply-adds, input, weights
python -m models "bn_inception*"          # only the names matching a wildcard
python -m models bn_inception             # one model's layer-by-layer summary, totals, weights
python -m models plain_cnn --input-shape 32,32,3 --classes 100 --normalization none
python -m models --weights                # every pretrained weight set: accuracy, preprocessing
python -m models convert bn_inception bn_inception-52deb4733.pth bn_inception.weights.h5
```

Arguments are parsed before TensorFlow is imported, so `--help` and command-line mistakes
answer at once; TensorFlow's C++ start-up logging is silenced. Errors are one line on stderr
(`--debug` shows the traceback); exit status 0, 2 for a bad command line (an unknown model or
option), 1 when a file cannot be read or converted, 130 after Ctrl-C.

This command is part of `models`, which imports nothing of `bnzoo`: it has its own few lines of
command-line plumbing (the same exit statuses as bnzoo's scripts).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

PROG = "python -m models"

CONVERT_EPILOG = (
    "The source is the file a weight set is published as: Cadene's bn_inception-52deb4733.pth "
    "for bn_inception, TF-slim's inception_v2.ckpt for bn_inception_slim. The model is built "
    "with the weight set's arguments, loaded and saved with model.save_weights; load the result "
    "with weights='DESTINATION'."
)


class UsageError(ValueError):
    """A bad command line: exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors raised (one line, exit status 2 through `run`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


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
    parser = _Parser(
        prog=PROG,
        description="List bnzoo's models with their parameters, multiply-adds and pretrained "
        "weights, or summarize one model. `python -m models convert --help` converts "
        "published weights into a Keras weights file.",
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
        help="the normalization switch (default: the model's)",
    )
    parser.add_argument(
        "--weights",
        action="store_true",
        help="list the pretrained weight sets (reported accuracy, preprocessing, source) "
        "instead of the models",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def build_convert_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m models convert",
        description="Convert a published checkpoint into a Keras .weights.h5 file.",
        epilog=CONVERT_EPILOG,
    )
    parser.add_argument("model", help="a model with pretrained weights, e.g. bn_inception")
    parser.add_argument("source", help="the published file (.pth, TF checkpoint)")
    parser.add_argument("destination", help="the Keras weights file to write (*.weights.h5)")
    parser.add_argument("--tag", default="imagenet", help="the weight set (default: imagenet)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
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


def _table(header: Sequence[str], rows: list[Sequence[str]], left: set[int]) -> str:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.ljust(width) if column in left else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _weight_tags(name: str) -> str:
    from . import list_weights

    return ", ".join(w.tag for w in list_weights(name)) or "-"


def list_table(names: Sequence[str], arguments: dict) -> str:
    """The table `python -m models` prints: one row per model."""
    from . import create_model, get_model_spec, profile_model

    header = (
        "model",
        "parameters",
        "trainable",
        "multiply-adds",
        "input",
        "weights",
        "description",
    )
    rows = []
    for name in names:
        spec = get_model_spec(name)
        profile = profile_model(create_model(name, **arguments))
        rows.append(
            (
                name,
                f"{profile.parameters:,}",
                f"{profile.trainable_parameters:,}",
                _format_count(profile.multiply_adds),
                "x".join(str(size) for size in profile.input_shape),
                _weight_tags(name),
                spec.description,
            )
        )
    return _table(header, rows, left={0, 4, 5, 6})


def weights_table() -> str:
    """The table `python -m models --weights` prints: one row per pretrained weight set."""
    from . import list_models, list_weights

    header = ("model", "weights", "top-1", "top-5", "preprocessing", "format", "reported by")
    rows = [
        (
            w.model,
            w.tag,
            f"{w.top1:.2f}" if w.top1 is not None else "-",
            f"{w.top5:.2f}" if w.top5 is not None else "-",
            w.preprocessing,
            w.source_format,
            w.accuracy_source,
        )
        for name in list_models()
        for w in list_weights(name)
    ]
    return _table(header, rows, left={0, 1, 4, 5, 6})


def summary_text(name: str, arguments: dict) -> str:
    """The text `python -m models NAME` prints: Keras' summary, the totals, the weights."""
    from . import create_model, get_model_spec, list_weights, profile_model
    from .preprocessing import get_convention

    spec = get_model_spec(name)
    model = create_model(name, **arguments)
    profile = profile_model(model)
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
    if spec.feature_layers:
        strides = ", ".join(str(stride) for stride in sorted(spec.feature_layers))
        lines.append(f"feature strides:  {strides} (models.create_feature_extractor)")
    weight_sets = list_weights(name)
    if not weight_sets:
        lines.append("weights:          none pretrained")
    for w in weight_sets:
        accuracy = f"top-1 {w.top1}%, top-5 {w.top5}% ({w.accuracy_source})" if w.top1 else ""
        lines += [
            f"weights:          {w.tag!r}: {w.description}",
            f"                  {accuracy}",
            f"                  preprocessing {w.preprocessing!r}: "
            f"{get_convention(w.preprocessing).description}",
            f"                  from {w.url}",
        ]
    return "\n".join(lines)


def convert(argv: Sequence[str]) -> int:
    args = build_convert_parser().parse_args(argv)
    models = _load_quietly()

    models.get_model_spec(args.model)  # an unknown name is a command-line error
    try:
        models.get_weights(args.model, args.tag)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if not args.destination.endswith(".weights.h5"):
        raise UsageError(
            f"destination {args.destination!r} must end in '.weights.h5' (Keras' weights format)"
        )
    path = models.convert_weights(args.model, args.source, args.destination, tag=args.tag)
    print(f"wrote {path}; load it with models.create_model({args.model!r}, weights={path!r})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        return convert(argv[1:])
    args = build_parser().parse_args(argv)
    models = _load_quietly()

    if args.weights:
        print(weights_table())
        return 0
    arguments = _builder_arguments(args)
    try:
        if any(character in args.name for character in "*?["):
            names = models.list_models(args.name)
            if not names:
                raise ValueError(
                    f"no model matches {args.name!r}; registered: {', '.join(models.list_models())}"
                )
            text = list_table(names, arguments)
        else:
            text = summary_text(args.name, arguments)
    except ValueError as error:
        # Everything here comes from the command line: the name, the shape, the classes.
        raise UsageError(str(error)) from None
    print(text)
    return 0


def _load_quietly():
    """The package, its builders loaded, with TensorFlow's C++ start-up logging silenced.

    TensorFlow's native libraries log through absl before absl is initialized, ignoring
    `TF_CPP_MIN_LOG_LEVEL` ("oneDNN custom operations are on", CUDA probes): file descriptor 2
    points at /dev/null while Keras imports its backend and TensorFlow probes for GPUs. A
    Python exception raised meanwhile still reaches the caller once stderr is back.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from . import load_builders

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            load_builders()
            if "tensorflow" in sys.modules:
                sys.modules["tensorflow"].config.list_physical_devices("GPU")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return sys.modules[__package__]


def run(argv: Sequence[str] | None = None) -> int:
    """`main` with one-line errors and an exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        if "--debug" in argv:
            raise
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1


if __name__ == "__main__":
    sys.exit(run())
