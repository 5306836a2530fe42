"""Progress bars for the long loops of the benchmarks: tqdm on stderr, so tables on stdout stay clean.

``TQDM_DISABLE=1`` in the environment turns them off (tqdm reads ``TQDM_*`` variables as defaults).
"""
from __future__ import annotations

import sys
from typing import Any, Optional

__all__ = ["progress_bar", "duration", "say"]


def progress_bar(label: Optional[str], total: int, unit: str = "it") -> Any:
    """A tqdm bar (also a context manager) of ``total`` steps titled ``label``; ``label=None`` gives a
    disabled one, for library callers that print their own progress. The bar is removed when done
    (``leave=False``) so that the output reads as the tables."""
    from tqdm import tqdm

    # `disable` is left to tqdm's default unless there is no label, so TQDM_DISABLE still applies.
    off = {} if label is not None else {"disable": True}
    return tqdm(total=total, desc=label, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True, **off)


def duration(seconds: float) -> str:
    """An estimate as it should be read: ``"40 s"`` (to 5 s) below a minute and a half, else ``"3 minutes"``."""
    if seconds < 90:
        return f"{max(5, 5 * round(seconds / 5))} s"
    return f"{round(seconds / 60)} minutes"


def say(text: str) -> None:
    """Print a line to stdout without breaking a progress bar that is on screen (``tqdm.write``)."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)
