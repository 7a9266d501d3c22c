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
    return configure(METHODS, method, knobs, ignore_unknown)


def configure(registry: dict[str, type], method: str, knobs: dict, ignore_unknown: bool = False):
    """Build ``registry[method]`` from ``knobs`` (``None`` values take the default), with clear errors for an
    unknown method or knob (unknown knobs are dropped instead with ``ignore_unknown``)."""
    if method not in registry:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(registry)}")
    cls = registry[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    unknown = set(knobs) - fields
    if unknown and not ignore_unknown:
        raise ValueError(f"method {method!r} has no knob(s) {sorted(unknown)}; it takes {sorted(fields)}")
    return cls(**{k: v for k, v in knobs.items() if k in fields})


__all__ = ["METHODS", "configure", "MethodConfig", "Selector", "SparseConfig", "make_method"]
