"""Progress bars with rate and ETA for the long steps (eval, calibrate, export checks, training, the benchmark).

tqdm draws them on stderr when stderr is a terminal and stays silent otherwise, so CI logs and
``--json`` output hold only the step's own summary lines, not thousands of redraws.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(total: int, what: str, unit: str = "it", initial: int = 0) -> Any:
    """A context-managed bar over ``total`` units named ``what``; ``update(n)`` and ``set_postfix_str`` on it."""
    return tqdm(
        total=total, initial=initial, desc=what, unit=unit, file=sys.stderr, disable=None, dynamic_ncols=True, mininterval=0.5,
        smoothing=0.1, leave=False,
    )  # fmt: skip
