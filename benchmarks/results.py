"""How every benchmark ends: one JSON line with its measured values, then the ``name=value`` line.

The JSON line (``{"benchmark": NAME, ...}``) is for scripts that collect results; the last line,
the same values as ``name=value`` pairs, is what a reader and the issue notes quote.
"""

from __future__ import annotations

import json
import math


def emit(benchmark: str, values: dict[str, float | str], digits: dict[str, int] | None = None) -> None:
    """Prints ``{"benchmark": benchmark, **values}`` as JSON, then ``k=v`` for each value, numbers
    rounded to ``digits[k]`` places (default 2). NaN (a peer that did not run) is JSON ``null``."""
    digits = digits or {}

    def rounded(k: str, v: float | str) -> float | str | None:
        if isinstance(v, str):
            return v
        return None if math.isnan(v) else round(float(v), digits.get(k, 2))

    print(json.dumps({"benchmark": benchmark, **{k: rounded(k, v) for k, v in values.items()}}))
    print(" ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v:.{digits.get(k, 2)}f}" for k, v in values.items()),
          flush=True)
