"""The one registry of methods, text and stream alike, selectable by name."""

from __future__ import annotations

import dataclasses
import typing

from livekv.methods.base import HostTier, MethodConfig, SparseConfig, StreamMethod
from livekv.methods.clusterkv import ClusterKVConfig
from livekv.methods.dense import DenseConfig
from livekv.methods.freekv import FreeKVConfig
from livekv.methods.livevlm import LiveVLMConfig
from livekv.methods.quest import QuestConfig
from livekv.methods.rekv import ReKVConfig
from livekv.methods.parsing import parse_value, split_specs
from livekv.methods.sink_window import SinkWindowConfig

METHODS: dict[str, type[MethodConfig]] = {cls.name: cls for cls in (
    DenseConfig, SinkWindowConfig, QuestConfig, FreeKVConfig, ClusterKVConfig, ReKVConfig, LiveVLMConfig)}
ALIASES: dict[str, type[MethodConfig]] = {alias: cls for cls in METHODS.values() for alias in cls.aliases}


def names(context: str) -> list[str]:
    """The names (aliases included) of the methods that run in ``context`` (``"text"`` or ``"stream"``)."""
    return [name for name, cls in {**METHODS, **ALIASES}.items() if context in cls.contexts]


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"livevlm:offload=true,recall_tokens=21"`` -> ``("livevlm", {"offload": True, "recall_tokens": 21})``: a
    method and knobs in one string (command lines, comparisons), each value read as its knob's type."""
    name, _, rest = spec.partition(":")
    cls = METHODS.get(name) or ALIASES.get(name)
    if cls is None:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join([*METHODS, *ALIASES])}")
    hints = typing.get_type_hints(cls)
    knobs = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in hints:
            raise ValueError(f"{spec!r}: expected KNOB=VALUE with a knob of {name} ({', '.join(hints)}), got {item!r}")
        try:
            knobs[key] = parse_value(value, hints[key])
        except ValueError as e:
            raise ValueError(f"{spec!r}: knob {key}: {e}") from None
    return name, knobs


def knob_options(context: str):
    """The knobs of every ``context`` method as command-line options, each once (text: the sparse knobs; streams:
    the stream knobs; the host tier's in both)."""
    from livekv.options import fields_of

    other = StreamMethod if context == "text" else SparseConfig
    skip = {f.name for f in dataclasses.fields(other)} - {f.name for f in dataclasses.fields(HostTier)}
    options: dict[str, list] = {}
    for cls in METHODS.values():
        if context in cls.contexts:
            for option in fields_of(cls, tuple(skip)):
                options.setdefault(option.name, []).append(option)
    # A knob whose default differs between methods (sink: 4 in sink_window, scaled with the budget in quest) shows
    # no one method's default.
    return [same[0] if len({repr(o.default) for o in same}) == 1 else
            dataclasses.replace(same[0], default="each method's own (`livekv methods`)") for same in options.values()]


def make_method(method: str | MethodConfig, *, context: str = "text", ignore_unknown: bool = False,
                **knobs) -> MethodConfig:
    """A method config from its name (or a spec, ``"quest:coarse_pages=0"``: see ``parse_spec``) and knobs
    (``None`` knobs take the method's default), for ``context``.

    ``ignore_unknown`` drops knobs the method does not take (e.g. ``budget`` for ``dense``) instead of raising:
    for comparing several methods under one set of knobs.
    """
    if isinstance(method, MethodConfig):
        if knobs:
            raise ValueError("pass knobs either in the method's config or as keywords, not both")
        cls = type(method)
    else:
        if ":" in method:  # a spec: its knobs win over the shared ones
            method, spec_knobs = parse_spec(method)
            knobs = {**knobs, **spec_knobs}
        cls = METHODS.get(method) or ALIASES.get(method)
        if cls is None or context not in cls.contexts:
            raise ValueError(f"unknown {context} method {method!r}; choose one of {', '.join(names(context))}")
    if context not in cls.contexts:
        raise ValueError(f"{cls.name} is not a {context} method; choose one of {', '.join(names(context))}")
    if isinstance(method, MethodConfig):
        return method
    fields = {f.name for f in dataclasses.fields(cls)}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    unknown = set(knobs) - fields
    if unknown and not ignore_unknown:
        raise ValueError(f"method {method!r} has no knob(s) {sorted(unknown)}; it takes {sorted(fields)}")
    return cls(**{k: v for k, v in knobs.items() if k in fields})


__all__ = ["ALIASES", "METHODS", "MethodConfig", "SparseConfig", "StreamMethod", "knob_options", "make_method", "names", "parse_spec",
           "parse_value", "split_specs"]
