"""huggingface_hub's download bars as log lines.

`snapshot_download` draws its bars (files fetched, bytes written) with the `tqdm_class` it is given.
A terminal bar redraws one line with carriage returns, which a log (the launcher forwards the prepare
step's stdout, plain or as JSON records) turns into noise or nothing. `download_progress(model_id)`
gives a tqdm class that prints a plain line instead: at most one per bar every `LOG_SECONDS` while
it moves, and one when it closes; a bar that never moved (a file already in the cache) prints
nothing. `HF_HUB_DISABLE_PROGRESS_BARS` silences it, as it does huggingface_hub's own bars.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from huggingface_hub.utils import are_progress_bars_disabled
from huggingface_hub.utils import tqdm as hub_tqdm

LOG_SECONDS = 5.0
# The bar of network bytes that Xet transfers add beside the bytes-on-disk bar; one bar of bytes is enough.
_TRANSFER_BAR = "huggingface_hub.snapshot_download.transfer"


class _Discard:
    """Where tqdm's own terminal output goes: the lines are printed by `display` instead."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def download_progress(model_id: str) -> Iterator[type[hub_tqdm]]:
    """A tqdm class for `snapshot_download(..., tqdm_class=...)` whose lines name `model_id`. Its bars
    are closed (their last lines printed) on leaving the context: snapshot_download leaves its bars of
    bytes open, to be closed whenever they are collected, which may be after the prepare step's JSON."""
    bars: list[hub_tqdm] = []

    class DownloadProgress(hub_tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(self)
            name = kwargs.get("name")
            is_silent = name == _TRANSFER_BAR or are_progress_bars_disabled(name)
            # huggingface_hub hides its bars when stderr is not a terminal; these lines are for logs.
            kwargs.update(disable=is_silent, file=_Discard(), mininterval=LOG_SECONDS, maxinterval=LOG_SECONDS)
            self._last_line, self._last_time = "", time.monotonic()
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None) -> bool:
            # Also called whenever a file starts and the total grows; `disable` is set once it closes. A
            # complete bar waits for its closing line.
            is_complete = bool(self.total) and self.n >= self.total
            is_due = self.disable or not is_complete and time.monotonic() - self._last_time >= LOG_SECONDS
            line = f"Downloading {model_id}: {self._progress()}"
            if self.n and is_due and line != self._last_line:  # closing right after a line would repeat it
                print(line, flush=True)
                self._last_line, self._last_time = line, time.monotonic()
            return True

        def _progress(self) -> str:
            if self.unit != "B":
                return f"{self.n} of {self.total} files done"
            total = f" of {_size(self.total)} ({100 * self.n // self.total}%)" if self.total else ""
            if self.disable:  # closing: how long it took, rather than the last rate
                return f"{_size(self.n)}{total} in {self.format_dict['elapsed']:.1f} s"
            rate = self.format_dict.get("rate")
            return f"{_size(self.n)}{total}" + (f", {_size(rate)}/s" if rate else "")

    try:
        yield DownloadProgress
    finally:
        for bar in bars:
            bar.close()


def _size(num_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"
