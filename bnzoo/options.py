"""Options declared once: a dataclass field per option, from which the command line, config files
and the checks of Python-made configs are all derived.

An option is a field whose metadata holds an `Option`: its help, its `Kind` (what values it takes
and how they are spelled), its flag and command-line group. From a dataclass of such fields,
`build_parser` makes the argparse parser, `values_from_mapping` reads a YAML mapping (a
`--config` file, a run's `config.yaml`) and `check_values` checks a Python object's values; all
three apply the same `Kind`, so a value accepted or refused in one place is accepted or refused
in the others, in the same words.

Where each says what is wrong:

- the command line: `argument --lr: must be in (0, 10], got '0'` (argparse's prefix);
- a file: `--config run.yaml: lr must be in (0, 10], got 0`;
- Python: `--lr must be in (0, 10], got 0`.

Also here: the strict YAML reader for those files (no duplicate keys, no aliases, bounded size).
No TensorFlow here: the command line is checked before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import yaml

from bnzoo.cli import UsageError

# --- Values ---------------------------------------------------------------------------------------

#: The largest and smallest (normal) float32 magnitudes: the optimizer and the layers compute in
#: float32, where a learning rate of 1e-300 is 0 and 1e308 is inf.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38
#: The words that spell "not set" (the option's automatic value) on the command line.
NONE_WORDS = ("none", "null")


@dataclasses.dataclass(frozen=True)
class Interval:
    """The values a numeric option accepts, e.g. `Interval(0, 1, high_open=True)` is `[0, 1)`."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = (
            str(int(bound)) if float(bound).is_integer() else f"{bound:g}"
            for bound in (self.low, self.high)
        )
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def close_matches(value: str, options: Sequence[str] | set[str]) -> str:
    """ "; did you mean 'x', 'y'?" for the options close to `value`, or ""."""
    matches = difflib.get_close_matches(value, sorted(options), n=3)
    return f"; did you mean {', '.join(map(repr, matches))}?" if matches else ""


class Problem(argparse.ArgumentTypeError):
    """Why a value is refused: the words after the option's name, ending in `got <value>`."""


class Kind:  # noqa: B024  (every method has a useful default)
    """What values an option takes and how they are spelled.

    `parse` reads command-line text (argparse's `type`), `read` a value from a YAML file,
    `check` a Python value. Each raises or returns a `Problem` whose message follows the
    option's name ("must be in (0, 1], got 2"). Subclasses override `parse` and `check`;
    `read` sends text through `parse`, so a file's `lr: 1e-3` (text to YAML) reads like the
    flag.
    """

    metavar: str | None = None
    #: The argparse action: "store", or "switch" for `--x/--no-x`, "append" for repeatable.
    action = "store"

    def parse(self, text: str) -> Any:
        return text

    def check(self, value: Any) -> Problem | None:
        return None

    def read(self, value: Any) -> Any:
        if isinstance(value, bool):
            raise Problem(f"must be a value, got {str(value).lower()}")
        if isinstance(value, (list, dict)):
            raise Problem(f"must be a single value, got {value!r}")
        if isinstance(value, str):
            return self.parse(value)
        if value is None:
            raise Problem("needs a value, got null")
        problem = self.check(value)
        if problem:
            raise problem
        return value

    def describe_choices(self) -> str | None:
        """What the option accepts, in a few words (the options table, and --help when
        `in_help`)."""
        return None

    def in_help(self) -> bool:
        """Whether --help states `describe_choices` (what the metavar does not say)."""
        return False


class Text(Kind):
    """Any text but an empty one (`''` is a shell-quoting slip, not a request)."""

    def parse(self, text: str) -> str:
        if not text.strip():
            raise Problem("must not be empty")
        return text

    def check(self, value: Any) -> Problem | None:
        if not isinstance(value, str) or not value.strip():
            return Problem(f"must not be empty, got {value!r}")
        return None

    def describe_choices(self) -> str:
        return "text"


class Choice(Kind):
    """One of a fixed set of words (argparse's `choices`)."""

    def __init__(self, choices: Sequence[str] | Callable[[], Sequence[str]]):
        self._choices = choices

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._choices() if callable(self._choices) else self._choices)

    def parse(self, text: str) -> str:
        problem = self.check(text)
        if problem:
            raise problem
        return text

    def check(self, value: Any) -> Problem | None:
        if value not in self.choices:
            if not self.choices:
                return Problem(
                    "must be one of the registered names, and none is registered yet, "
                    f"got {value!r}"
                )
            return Problem(
                f"must be one of {', '.join(self.choices)}, got {value!r}"
                f"{close_matches(str(value), self.choices)}"
            )
        return None

    def describe_choices(self) -> str:
        return " \\| ".join(self.choices) if self.choices else "a registered name (none yet)"


class Number(Kind):
    """A number in `interval`: an integer (not a bool, not 3.0) with `integer`, else a finite
    float that, unless only the host computes with it (`host`), float32 can represent."""

    def __init__(self, interval: Interval, *, integer: bool = False, host: bool = False):
        self.interval = interval
        self.integer = integer
        self.host = host

    def parse(self, text: str) -> int | float:
        try:
            value = (int if self.integer else float)(text)
        except ValueError:
            raise Problem(f"{self._expected()}, got {text!r}") from None
        why = self._why(value)
        if why:
            raise Problem(f"{why}, got {text!r}")
        return value

    def check(self, value: Any) -> Problem | None:
        why = self._why(value)
        return Problem(f"{why}, got {value!r}") if why else None

    def read(self, value: Any) -> int | float:
        value = super().read(value)
        return value if self.integer else float(value)

    def _expected(self) -> str:
        interval = self.interval
        if self.integer:
            if interval.low == 1:
                return f"must be a positive integer (at most {interval.high:.0f})"
            return f"must be an integer in {interval}"
        return f"must be a number in {interval}"

    def _why(self, value: Any) -> str | None:
        interval = self.interval
        if self.integer:
            if isinstance(value, bool) or not isinstance(value, int) or value not in interval:
                return self._expected()
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return self._expected()
        if not math.isfinite(value):
            return f"must be a finite number in {interval}"
        in_float32 = value == 0 or FLOAT32_TINY <= abs(value) <= FLOAT32_MAX
        if not self.host and not in_float32:
            return f"must be in {interval} and representable in float32 (training computes in it)"
        if value not in interval:
            return f"must be in {interval}"
        return None

    def describe_choices(self) -> str:
        if self.integer and self.interval.low == 1:
            return f"integer, 1 to {self.interval.high:,.0f}"
        return ("integer in " if self.integer else "") + str(self.interval)

    def in_help(self) -> bool:
        return True


class Optional(Kind):
    """`kind`, or `none`/`null` for "not set" (None, the option's automatic value)."""

    def __init__(self, kind: Kind, none_means: str):
        self.kind = kind
        self.none_means = none_means
        self.metavar = kind.metavar

    def parse(self, text: str) -> Any:
        if text.strip().lower() in NONE_WORDS:
            return None
        if not text.strip():
            raise Problem(f"must not be empty (use none for {self.none_means})")
        return self.kind.parse(text)

    def check(self, value: Any) -> Problem | None:
        if value is None:
            return None
        if isinstance(value, str) and not value.strip() and isinstance(self.kind, Text):
            return Problem(f"must not be empty, got {value!r}; use none for {self.none_means}")
        return self.kind.check(value)

    def read(self, value: Any) -> Any:
        if value is None:
            return None
        return self.parse(value) if isinstance(value, str) else self.kind.read(value)

    def describe_choices(self) -> str | None:
        inner = self.kind.describe_choices()
        return f"{inner} or none" if inner else None

    def in_help(self) -> bool:
        return self.kind.in_help()


class Switch(Kind):
    """On or off: `--x/--no-x`; with `automatic`, None (leaving both out) is a third value."""

    action = "switch"

    def __init__(self, automatic: bool = False):
        self.automatic = automatic

    def check(self, value: Any) -> Problem | None:
        if isinstance(value, bool) or (self.automatic and value is None):
            return None
        return Problem(f"is a switch: true or false, got {value!r}")

    def read(self, value: Any) -> Any:
        if isinstance(value, bool) or (self.automatic and value is None):
            return value
        expected = "true, false or null" if self.automatic else "true or false"
        raise Problem(f"must be {expected}, got {value!r}")

    def describe_choices(self) -> str:
        return "switch" + (" (unset: automatic)" if self.automatic else "")


#: A `--model-arg` value that starts like a Python/YAML collection or quoted string must parse
#: as one: `widths=[abc` is a typo, not the string "[abc".
_LITERAL_OPENERS = ("[", "(", "{", "'", '"')


def parse_literal(text: str) -> Any:
    """A literal value: Python (`0.5`, `[32, 64]`, `(3, 3)`, `1e-3`) or, failing that, YAML
    (`true`, `null`, bare words such as `relu`).

    Raises:
        ValueError: the text opens a list, tuple, mapping or quoted string that does not
            close, or it parses to something other than numbers, strings, booleans, null and
            lists/mappings of them (YAML dates, for instance).
    """
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            value = yaml.load(text, Loader=StrictYamlLoader)  # noqa: S506 (a SafeLoader)
        except (yaml.YAMLError, RecursionError):
            if text.strip().startswith(_LITERAL_OPENERS):
                raise ValueError(
                    f"{text!r} is not a valid literal (unbalanced brackets or quotes?); e.g. "
                    "[32, 64], (3, 3), 'relu'"
                ) from None
            value = text
    if not is_plain(value):
        raise ValueError(
            f"{text!r} is a {type(value).__name__}; a model argument must be a number, a string, "
            "true/false, null, or a list or mapping of them"
        )
    return value


def is_plain(value: Any, depth: int = 0) -> bool:
    """Whether `value` is made of numbers, strings, booleans, null, lists and string-keyed
    mappings only (what YAML and JSON write back unchanged)."""
    if depth > 100:
        return False
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v, depth + 1) for k, v in value.items())
    return False


class KeywordArguments(Kind):
    """Keyword arguments, given one `KEY=VALUE` per flag (repeatable; later keys win) or as a
    mapping in a file. VALUE is a Python or YAML literal (`parse_literal`)."""

    action = "append"
    metavar = "KEY=VALUE"

    def parse(self, text: str) -> tuple[str, Any]:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise Problem(
                f"expected KEY=VALUE with KEY a builder keyword (e.g. widths=[32,64]), got {text!r}"
            )
        if not value.strip():
            raise Problem(f"{key}= needs a value (e.g. {key}=null for None), got {text!r}")
        try:
            return key, parse_literal(value.strip())
        except ValueError as error:
            raise Problem(f"{key}={value}: {error}") from None

    def check(self, value: Any) -> Problem | None:
        if not isinstance(value, dict):
            return Problem(f"must be a mapping of keyword: value, got {value!r}")
        for key, item in value.items():
            if not isinstance(key, str) or not key.isidentifier():
                return Problem(f"keys must be keyword names, got {key!r}")
            if not is_plain(item):
                return Problem(
                    f"{key}: {item!r} is a {type(item).__name__}; use numbers, strings, "
                    "true/false, null or lists of them"
                )
        return None

    def read(self, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise Problem(f"must be a mapping such as {{widths: [32, 64]}}, got {value!r}")
        problem = self.check(value)
        if problem:
            raise problem
        return dict(value)


# --- Declarations ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """How one field is offered to users (see `option`)."""

    help: str
    kind: Kind
    group: str
    flag: str | None = None
    metavar: str | None = None
    #: The field's value that `derive` replaces when the run resolves its configuration.
    automatic: Any = None
    #: Computes the value the run uses when the field holds `automatic` (`resolved()`).
    derive: Callable[[Any], Any] | None = None
    #: Written to the run's config.yaml (False: an action on the folder, e.g. --overwrite).
    saved: bool = True
    #: Part of what makes two runs the same run (False: a location, how many processes).
    identity: bool = True
    #: The default as the help shows it, when the value itself would not say it.
    default_text: str | None = None


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002  (argparse's name)
    *,
    kind: Kind | None = None,
    group: str,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    **details: Any,
) -> Any:
    """A dataclass field declaring a user option: its default, help, kind and group; see
    `Option` for `details` (flag, metavar, automatic, derive, saved, identity)."""
    declared = Option(help=help, kind=kind or Text(), group=group, **details)
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={"option": declared}
    )


def declared_options(cls_or_object: Any) -> Iterator[tuple[dataclasses.Field, Option]]:
    """The (field, Option) pairs of a dataclass, in declaration order."""
    for field in dataclasses.fields(cls_or_object):
        declared = field.metadata.get("option")
        if declared is not None:
            yield field, declared


def flag_of(field: dataclasses.Field, declared: Option) -> str:
    return declared.flag or "--" + field.name.replace("_", "-")


def field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _help_text(field: dataclasses.Field, declared: Option) -> str:
    kind = declared.kind
    notes = [f"accepts {kind.describe_choices()}"] if kind.in_help() else []
    shown = declared.default_text or (
        None if isinstance(kind, KeywordArguments) else _show(field_default(field))
    )
    if shown:
        notes.append(f"default: {shown}")
    text = declared.help + (f" ({'; '.join(notes)})" if notes else "")
    return text.replace("%", "%%")  # argparse %-formats help texts


# --- The command line -----------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises `UsageError` instead of printing usage and exiting, so the CLI
    reports a bad flag as one line like every other user error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes `-1e-3` and `-inf` for options (its pattern knows only `-1` and `-.5`),
        # so `--lr -1e-3` would read "expected one argument" instead of the range it breaks.
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.IGNORECASE
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def _argparse_type(kind: Kind, name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return kind.parse(text)

    parse.__name__ = name  # argparse names the type in "invalid <name> value"
    return parse


def add_options(parser: ArgumentParser, cls: type, groups: Mapping[str, str]) -> None:
    """Add a flag per declared option of `cls` to `parser`, in `groups` (name: title) order.

    Every flag's default is `argparse.SUPPRESS`: the parsed namespace holds exactly the options
    given on the command line, so that they can be layered over a config file, a recipe and
    the declared defaults (the caller's job).
    """
    sections = {name: parser.add_argument_group(title) for name, title in groups.items()}
    for field, declared in declared_options(cls):
        kind = declared.kind
        arguments: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": _help_text(field, declared),
        }
        if kind.action == "switch":
            arguments["action"] = argparse.BooleanOptionalAction
        elif isinstance(kind, Choice):
            # argparse's own check: "invalid choice: 'adagrad' (choose from sgd, adam, adamw)"
            arguments["choices"] = kind.choices
        else:
            arguments["type"] = _argparse_type(kind, field.name)
            arguments["metavar"] = declared.metavar or kind.metavar or _metavar(field, kind)
            if kind.action == "append":
                arguments["action"] = "append"
        sections[declared.group].add_argument(flag_of(field, declared), **arguments)


def _metavar(field: dataclasses.Field, kind: Kind) -> str:
    inner = kind.kind if isinstance(kind, Optional) else kind
    if isinstance(inner, Choice) and inner.choices:
        return "{" + ",".join(inner.choices) + ("" if inner is kind else ",none") + "}"
    return field.name.upper()


def command_line_values(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options that `namespace` (from a parser made by `add_options`) holds, as field
    values: repeated `KEY=VALUE` flags become one mapping."""
    values = {}
    for field, declared in declared_options(cls):
        if hasattr(namespace, field.name):
            value = getattr(namespace, field.name)
            values[field.name] = dict(value) if declared.kind.action == "append" else value
    return values


# --- Files ----------------------------------------------------------------------------------------


def values_from_mapping(
    mapping: Mapping[Any, Any], cls: type, what: str, *, error: type[ValueError] = UsageError
) -> dict[str, Any]:
    """A config file's `{key: value}` as field values of `cls`, each read by its option's kind.

    Keys are option names with `_` or `-` (`batch_size`, `batch-size`).

    Raises:
        `error` starting with `what`: an unknown key (with close matches), a key spelled twice,
            or a value its option refuses (`{what}: lr must be in (0, 10], got 0`).
    """
    options = {field.name: declared for field, declared in declared_options(cls)}
    spelled: dict[str, str] = {}
    values: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise error(f"{what}: {key!r} is not an option name (keys are names such as epochs)")
        name = key.replace("-", "_")
        if name not in options:
            raise error(f"{what}: unknown option {key!r}{close_matches(name, options)}")
        if name in spelled:
            raise error(f"{what}: {spelled[name]!r} and {key!r} set the same option; keep one")
        spelled[name] = key
        try:
            values[name] = options[name].kind.read(value)
        except Problem as problem:
            hint = ""
            if isinstance(value, bool) and isinstance(options[name].kind, Optional):
                hint = " (use null to turn it off)"
            raise error(f"{what}: {key} {problem}{hint}") from None
    return values


def check_values(config: Any) -> None:
    """Check every declared option's value of dataclass object `config` by its kind.

    Raises:
        UsageError: `--flag <problem>` for the first value its option refuses.
    """
    for field, declared in declared_options(config):
        problem = declared.kind.check(getattr(config, field.name))
        if problem:
            raise UsageError(f"{flag_of(field, declared)} {problem}")


class _RefusedYaml(yaml.YAMLError):
    pass


#: A config file is a few kilobytes; this bounds what a file from elsewhere can make us read.
MAX_CONFIG_BYTES = 1024 * 1024


class StrictYamlLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping holding the same key twice and any alias.

    PyYAML keeps the last of two equal keys, so `batch_size: 64` further up a file would be
    accepted and ignored. An alias (`*name`) repeats a node without copying it in the file, so
    a few hundred bytes of nested aliases ("billion laughs") expand into billions of values
    when converted; no config value needs one.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _RefusedYaml(
                f"line {event.start_mark.line + 1}: an alias (*{event.anchor}) repeats a value by "
                "reference, which config files do not accept; write the value out"
            )
        return super().compose_node(parent, index)


def _construct_mapping_without_duplicates(loader: StrictYamlLoader, node: yaml.MappingNode):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key; construct_mapping reports it
            continue
        if duplicate:
            raise _RefusedYaml(
                f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); keep one"
            )
    return loader.construct_mapping(node, deep=True)


StrictYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates
)


def read_yaml_mapping(path: str, what: str, error: type[ValueError] = UsageError) -> dict[Any, Any]:
    """A YAML file's top-level mapping (empty for an empty file), read strictly.

    Raises:
        FileNotFoundError: `path` is not a regular file.
        `error` (UsageError for a `--config` file, a command-line error; ValueError for a run
        folder's file): larger than `MAX_CONFIG_BYTES`, invalid YAML, a key set twice, an
        alias, or something other than a mapping; the message starts with `what`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: not a regular file")
    with open(path, "rb") as stream:
        data = stream.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise error(
            f"{what}: larger than {MAX_CONFIG_BYTES // 1024} KiB, too large for a config file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what}: not a text (UTF-8) file") from None
    try:
        values = yaml.load(text, Loader=StrictYamlLoader)  # noqa: S506 (a SafeLoader)
    except _RefusedYaml as problem:
        raise error(f"{what}: {problem}") from None
    except yaml.YAMLError as problem:
        raise error(f"{what}: not valid YAML ({' '.join(str(problem).split())})") from None
    except RecursionError:
        raise error(f"{what}: nested too deeply to be a config file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise error(f"{what}: expected a mapping of option: value, got {_short(values)}")
    return values


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- Small argparse types for scripts' own arguments ----------------------------------------------


def non_empty(text: str) -> str:
    """argparse type: any text but an empty one."""
    return Text().parse(text)


def optional(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type: `convert`, or `none`/`null` for None; an empty value is refused."""

    def parse(text: str) -> Any:
        if text.strip().lower() in NONE_WORDS:
            return None
        if not text.strip():
            raise argparse.ArgumentTypeError("must not be empty (use none to leave it unset)")
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value
