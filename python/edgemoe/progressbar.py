"""Progress bars for the command-line tools: tqdm on stderr, drawn only where stderr is a terminal.

`terminal_progress` is the progress factory edgemoe-compile hands the compiler
(compiler/progress.py): called as tqdm is, it returns the iterable it is given, counted on a bar.
"""
from __future__ import annotations

import sys
import threading

from tqdm import tqdm


class TickingBar(tqdm):
    """A tqdm bar that redraws twice a second on its own, so a stage that is one long step (tvm.compile)
    shows its time running instead of a frozen 0/1."""

    def __init__(self, *args, **kwargs):
        self._stop = threading.Event()
        self._ticker = None
        super().__init__(*args, **kwargs)
        if not self.disable:
            self._ticker = threading.Thread(target=self._tick, name="progress-ticker", daemon=True)
            self._ticker.start()

    def _tick(self):
        while not self._stop.wait(0.5):
            self.refresh()

    def close(self):
        self._stop.set()
        ticker, self._ticker = getattr(self, "_ticker", None), None
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join()
        super().close()


def terminal_progress(iterable=None, desc: str | None = None, total: int | None = None, unit: str = "it"):
    """A bar on stderr counting `iterable`; silent (the iterable passed through) when stderr is not a
    terminal."""
    return TickingBar(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, disable=None, leave=True,
                      dynamic_ncols=True)
