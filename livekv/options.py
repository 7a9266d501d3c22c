"""Command-line options made from config dataclasses: one ``--knob-name`` per field, its type from the annotation
and its help from the field's metadata. The knobs of methods and the server's settings live in one place each.
Beside them, the argparse types livekv's other options share (``ints``, ``positive_int``, ``positive_float``,
``weights_list``, ``argument_type``)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass

from livekv.methods.parsing import parse_value
from livekv.quantize import WEIGHTS


@dataclass(frozen=True)
class Option:
    name: str
    hint: object
    default: object
    help: str
    parse: object = None  # text -> value (ValueError when wrong), where the text is not the value as the hint reads it
    metavar: str | None = None


def fields_of(cls, skip: tuple[str, ...] = ()) -> list[Option]:
    """An option per dataclass field of ``cls`` (its help from the first class in the MRO that gives one; ``parse``
    and ``metavar`` from its metadata)."""
    hints = typing.get_type_hints(cls)
    return [Option(f.name, hints[f.name], f.default, _help(cls, f.name), f.metadata.get("parse"),
                   f.metadata.get("metavar")) for f in dataclasses.fields(cls) if f.name not in skip]


def add_options(parser: argparse.ArgumentParser, options: list[Option]) -> None:
    """``--name`` for each option (default ``None``: only what is given overrides the config's default). The help
    ends with the default, unless it already says what the default is."""
    for option in options:
        flag = "--" + option.name.replace("_", "-")
        default = ",".join(option.default) if isinstance(option.default, tuple) else option.default
        text = option.help
        if "(default" not in text:
            text += f" (default: {'set by the code' if default is dataclasses.MISSING else default})"
        if option.parse is not None:
            parser.add_argument(flag, type=argument_type(option.parse), metavar=option.metavar, default=None, help=text)
        elif set(typing.get_args(option.hint) or [option.hint]) - {type(None)} == {bool}:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(option.hint) is tuple:
            parser.add_argument(flag, type=_items, default=None, help=text + "; comma-separated")
        else:
            parser.add_argument(flag, type=_typed(option.hint, flag), default=None, help=text)


def given(args: argparse.Namespace, options: list[Option]) -> dict:
    """The options that were given on the command line."""
    return {o.name: getattr(args, o.name) for o in options if getattr(args, o.name, None) is not None}


def _help(cls, name: str) -> str:
    for klass in cls.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and field.metadata.get("help"):
            return field.metadata["help"]
    return ""


def _typed(hint, flag: str):
    def parse(text: str):
        try:
            return parse_value(text, hint)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{flag}: {e}") from None
    parse.__name__ = flag
    return parse


def _items(text: str) -> tuple[str, ...]:
    return tuple(item for item in text.split(",") if item)


def ints(text: str) -> list[int]:
    """The argparse type of comma-separated positive integers (``"2048,4096"``); argparse names the flag in the
    error."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """The argparse type of an integer >= 1."""
    return _number(int, text, lambda value: value >= 1, "an integer >= 1")


def positive_float(text: str) -> float:
    """The argparse type of a number > 0."""
    return _number(float, text, lambda value: value > 0, "a number > 0")


def _number(kind, text: str, fits, what: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not fits(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def weights_list(text: str) -> list[str]:
    """The argparse type of comma-separated ``--weights`` kinds (``"float32,int8"``)."""
    kinds = [x.strip() for x in text.split(",") if x.strip()]
    wrong = [k for k in kinds if k not in WEIGHTS]
    if not kinds or wrong or len(set(kinds)) < len(kinds):
        raise argparse.ArgumentTypeError(f"expected distinct kinds of {', '.join(WEIGHTS)}, comma-separated, "
                                         f"got {text!r}")
    return kinds


def argument_type(parse):
    """``parse`` (text -> value, ValueError when wrong) as an argparse type that reports the ValueError's words."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    convert.__name__ = parse.__name__
    return convert
