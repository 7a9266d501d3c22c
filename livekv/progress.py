"""Progress of long work: tqdm bars on stderr (done/total, rate, ETA), so that stdout stays for results."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm import tqdm


def bar(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A bar of ``total`` units on stderr (a no-op bar when not ``enabled``)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def above_bars(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` writing its lines above the bars shown on the terminal (the bars are cleared, then redrawn)."""

    def write(line: str) -> None:
        with tqdm.external_write_mode(file=sys.stdout):
            log(line)

    return write
