"""What a run reports as it goes: the ``history=`` file (one JSON line per iteration) and
the progress bar (tqdm, unless ``quiet``)."""
from __future__ import annotations

import json

from .checkpoint import jsonable

__all__ = ["RunLog"]


class RunLog:
    """A context manager writing each iteration's record to the history file and the
    progress bar; closes both on exit.

    A resumed run rewrites the history file up to its checkpoint: records of iterations
    that ran after that checkpoint (then were lost to a kill) are not kept twice.

    :param history_path: the ``history=`` file, or None.
    :param quiet: no progress bar.
    :param earlier: the records of the iterations before this run's start (resume).
    :param total: the planned number of iterations.
    :param what: what the bar says it trains (a stage's objective), or None.
    """

    def __init__(self, history_path: str | None, quiet: bool, earlier: list, total: int, *, what: str | None = None):
        self._what = what
        self._history_path = history_path
        self._earlier = earlier
        self._total = total
        self._quiet = quiet
        self._file = None
        self._bar = None

    def __enter__(self) -> "RunLog":
        if self._history_path:
            self._file = open(self._history_path, "w")
            for record in self._earlier:
                self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if not self._quiet:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self._total, initial=len(self._earlier), desc="otflow fit" + (f" ({self._what})" if self._what else ""), unit="it",
                                 leave=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()

    def write(self, record: dict) -> None:
        """Report one iteration's record."""
        if self._file is not None:
            self._file.write(json.dumps(jsonable(record)) + "\n")
            self._file.flush()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.3f}", nfe=record["nfe_forward"], refresh=False)
