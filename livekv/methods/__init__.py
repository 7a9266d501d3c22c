"""The registry of methods, selectable by name."""

from __future__ import annotations

import dataclasses

from livekv.methods.base import MethodConfig, Selector, SparseConfig
from livekv.methods.clusterkv import ClusterKVConfig
from livekv.methods.dense import DenseConfig
from livekv.methods.freekv import FreeKVConfig
from livekv.methods.quest import QuestConfig
from livekv.methods.sink_window import SinkWindowConfig

METHODS: dict[str, type[MethodConfig]] = {
    cls.name: cls for cls in (DenseConfig, SinkWindowConfig, QuestConfig, FreeKVConfig, ClusterKVConfig)
}


def make_method(method: str | MethodConfig, *, ignore_unknown: bool = False, **knobs) -> MethodConfig:
    """A method config from its name and knobs (``None`` knobs take the method's default).

    ``ignore_unknown`` drops knobs the method does not take (e.g. ``budget`` for ``dense``) instead of raising:
    for comparing several methods under one set of knobs.
    """
    if isinstance(method, MethodConfig):
        if knobs:
            raise ValueError("pass knobs either in the MethodConfig or as keywords, not both")
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    unknown = set(knobs) - fields
    if unknown and not ignore_unknown:
        raise ValueError(f"method {method!r} has no knob(s) {sorted(unknown)}; it takes {sorted(fields)}")
    return cls(**{k: v for k, v in knobs.items() if k in fields})


__all__ = ["METHODS", "MethodConfig", "Selector", "SparseConfig", "make_method"]
