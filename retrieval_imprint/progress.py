"""Progress reports: a tqdm bar on a terminal, plain periodic lines anywhere else.

A bar redrawn with carriage returns is noise in a CI log or a file (one endless line), and no
progress at all leaves minutes of silence; off a terminal the same bar is printed as one line
every ``LOG_INTERVAL`` seconds instead, starting once the work has run that long (a quick command
prints nothing).
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm.auto import tqdm

LOG_INTERVAL = 10.0  # seconds between progress lines when stderr is not a terminal


class _Lines:
    """A file for tqdm that turns each redraw (``\\r`` + status) into one line of ``out``."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.last = out, ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line and line != self.last:  # (closing redraws the last state once more)
            self.out.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.out.flush()


def bar(*, total: int, desc: str, unit: str, enabled: bool) -> tqdm:
    """A progress bar over ``total`` units (disabled unless ``enabled``)."""
    err = sys.stderr
    if not enabled or err.isatty():
        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=err)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(err),
        mininterval=LOG_INTERVAL,
        delay=LOG_INTERVAL,
        ascii=True,
        dynamic_ncols=False,
        ncols=80,
    )
