"""Knob values and method lists from text (command lines, specs such as ``livevlm:offload=true``)."""

from __future__ import annotations

import types
import typing


def parse_value(text: str, hint):
    """A knob's value from text, by its type hint: ``none``, booleans (``true``/``false``), ints, floats, text."""
    if text.lower() == "none":
        return None
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if bool in kinds:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(text)
            except ValueError:
                if float not in kinds or kind is float:
                    raise ValueError(f"expected {kind.__name__}, got {text!r}") from None
    return text


def split_specs(text: str) -> list[str]:
    """``"full,livevlm:offload=true,recall_tokens=21,rekv"`` -> ``["full", "livevlm:offload=true,recall_tokens=21",
    "rekv"]``: a comma starts a new method unless what follows is another ``KNOB=VALUE`` of the same one."""
    out: list[str] = []
    for part in filter(None, text.split(",")):
        if out and ":" in out[-1] and "=" in part and ":" not in part:
            out[-1] += "," + part
        else:
            out.append(part)
    return out
