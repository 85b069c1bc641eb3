"""Progress without configuring logging: what `train(progress=...)` shows in a notebook.

The library logs through module loggers under `lmops_jax` (at INFO: the run's facts, the progress line
`[####......]  20% step 60/300 loss ...`, where the outputs are) and leaves configuring logging to the
application. The CLI configures it (`cli.runner.configure_logging`: lmops_jax at INFO, everyone else
from WARNING). A notebook configures nothing, so Python's default level (WARNING) hides every line.
`Display` shows them for one call: a handler on the `lmops_jax` logger prints its lines on stdout,
through `tqdm.write` above a bar advanced every step when tqdm is installed. No other logger is touched,
so Orbax's (absl's), seqio's and TensorFlow's INFO records stay hidden.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

LIBRARY_LOGGER = "lmops_jax"


def logging_shows_info(logger: logging.Logger) -> bool:
    """Whether logging as configured emits `logger`'s INFO records: the level lets them through and a
    handler at INFO or below sits on the logger or on an ancestor it propagates to."""
    if not logger.isEnabledFor(logging.INFO):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        if any(handler.level <= logging.INFO for handler in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


class _LineHandler(logging.Handler):
    """Prints each record's message as one line on stdout (warnings and errors prefixed with their level),
    through `tqdm.write` when a bar may be showing, which redraws the bar below the line."""

    def __init__(self, tqdm: Any):
        super().__init__(logging.INFO)
        self._tqdm = tqdm

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            line = message if record.levelno <= logging.INFO else f"{record.levelname}: {message}"
            if self._tqdm is None:
                print(line, flush=True)
            else:
                self._tqdm.write(line, file=sys.stdout)
        except Exception:  # logging's contract: a failing handler reports and never raises
            self.handleError(record)


class Display:
    """`with Display(progress, total_steps) as display:` shows the library's log lines on stdout inside
    the block; `display.advance(step)` after each step moves the bar (tqdm, when installed).

    progress: True shows them; False leaves logging as the application configured it; None shows them
    unless logging already does (the CLI, or an application that configured INFO), so no line appears
    twice. While shown, the `lmops_jax` logger is at INFO and does not propagate (root's handlers would
    print the same lines again); both are restored on exit.
    """

    def __init__(self, progress: bool | None, total_steps: int):
        self._logger = logging.getLogger(LIBRARY_LOGGER)
        self.enabled = not logging_shows_info(self._logger) if progress is None else bool(progress)
        self._total = total_steps
        self._tqdm: Any = None
        self._bar: Any = None
        self._handler: _LineHandler | None = None
        self._saved = (logging.NOTSET, True)  # the logger's level and propagate, restored on exit

    def __enter__(self) -> Display:
        if not self.enabled:
            return self
        try:
            from tqdm.auto import tqdm
            self._tqdm = tqdm
        except ImportError:
            self._tqdm = None
        self._handler = _LineHandler(self._tqdm)
        self._saved = (self._logger.level, self._logger.propagate)
        self._logger.addHandler(self._handler)
        if not self._logger.isEnabledFor(logging.INFO):
            self._logger.setLevel(logging.INFO)
        self._logger.propagate = False
        return self

    def advance(self, step: int) -> None:
        """Moves the bar to `step` (it starts at the first step this call runs, e.g. after a resume)."""
        if self._tqdm is None:
            return
        if self._bar is None:
            self._bar = self._tqdm(total=self._total, initial=step - 1, unit="step", dynamic_ncols=True)
        self._bar.update(step - self._bar.n)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._logger.setLevel(self._saved[0])
            self._logger.propagate = self._saved[1]
