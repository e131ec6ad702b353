"""`--model` and `--model-arg` checked against the registry and the builder's signature.

A model builder reports a bad keyword as a TypeError from deep inside Keras (`widths=32` fails in
`tuple(32)`, five frames down). Every builder in `models/` is typed, so `train.py` checks each
`--model-arg` against the builder's signature and type hints before anything is loaded or
built, and names the option, its expected type and an example, in one line.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import types
import typing
from typing import Any

from bnzoo.cli import UsageError
from bnzoo.config import RESERVED_MODEL_ARGS, TrainConfig, close_matches

_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
_SEQUENCES = (
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    list,
    tuple,
)


def matches(value: Any, hint: Any) -> bool:
    """Whether `value` (parsed from the command line or YAML) fits type hint `hint`.

    Lists stand for any sequence (the command line has no tuples in YAML), ints are numbers,
    and a bool is not an int. Hints this does not understand accept everything: the builder
    has the last word.
    """
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in _SEQUENCES or hint in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(
                matches(item, arg) for item, arg in zip(value, args, strict=True)
            )
        return not args or all(matches(item, args[0]) for item in value)
    if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:
    """`hint` in words: "a list of integers", "a number or null"."""
    if hint is None or hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(describe(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    simple = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if hint in simple:
        return simple[hint]
    if origin in _SEQUENCES or hint in _SEQUENCES:
        if origin is tuple and args and args[-1] is not Ellipsis:
            kinds = {_PLURALS.get(arg, "values") for arg in args}
            return f"a list of {len(args)} {kinds.pop() if len(kinds) == 1 else 'values'}"
        return f"a list of {_PLURALS.get(args[0], 'values')}" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def _literal(value: Any) -> str:
    """`value` as the command line would spell it."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value)).replace(" ", "")
    return json.dumps(value)


def check_model_options(config: TrainConfig) -> None:
    """Check `config.model` and each `--model-arg` against the registry and the builder.

    Raises:
        UsageError: an unknown model (with close matches), a keyword the builder does not take
            or that train.py sets itself, or a value of the wrong type for the builder's type
            hint; the message names the option, what it takes and an example.
    """
    from bnzoo import models

    try:
        spec = models.get_model_spec(config.model)
    except ValueError as error:
        raise UsageError(f"--model {config.model}: {error}") from None
    parameters = inspect.signature(spec.builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    options = sorted(name for name in parameters if name not in RESERVED_MODEL_ARGS)
    try:
        hints = typing.get_type_hints(spec.builder)
    except Exception:  # an annotation that does not evaluate: leave the types to the builder
        hints = {}
    for key, value in config.model_args.items():
        if key in RESERVED_MODEL_ARGS:
            raise UsageError(f"--model-arg {key}=... is not allowed: {RESERVED_MODEL_ARGS[key]}")
        if key not in parameters:
            if takes_any:
                continue
            raise UsageError(
                f"--model-arg {key}=...: {config.model} has no option {key!r}"
                f"{close_matches(key, options)} (its options: {', '.join(options)})"
            )
        hint = hints.get(key)
        if hint is not None and not matches(value, hint):
            default = spec.default_kwargs.get(key, parameters[key].default)
            example = (
                f", e.g. {key}={_literal(default)}"
                if default is not inspect.Parameter.empty and default is not None
                else ""
            )
            raise UsageError(
                f"--model-arg {key}={_literal(value)}: {config.model}'s {key} takes "
                f"{describe(hint)}{example}"
            )
