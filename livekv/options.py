"""Command-line options made from config dataclasses: one ``--knob-name`` per field, its type from the annotation
and its help from the field's metadata. The knobs of methods and the server's settings live in one place each."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from livekv.methods import parse_value


def add_options(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), seen: set | None = None) -> None:
    """``--name`` for each field of ``cls`` not in ``skip`` (or in ``seen``, which collects the names added)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip or (seen is not None and field.name in seen):
            continue
        hint, flag = hints[field.name], "--" + field.name.replace("_", "-")
        help_ = f"{field.metadata.get('help', '')} (default: {_default(field)})"
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, type=_items, default=None, help=help_ + "; comma-separated")
        else:
            parser.add_argument(flag, type=_typed(hint, flag), default=None, help=help_)
        if seen is not None:
            seen.add(field.name)


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


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


def _default(field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
        return ",".join(value) if isinstance(value, tuple) else str(value)
    return "set by the code"
