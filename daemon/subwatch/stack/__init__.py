"""Live stacking: running weighted means per (target, filter) that match a batch integration.

``accumulator`` holds the float64 per-pixel sums (weights, coverage, rejection); ``session``
ties an accumulator to its reference sub, its quality history and its totals.
"""

from subwatch.stack.accumulator import AddResult, WeightedAccumulator
from subwatch.stack.session import StackSession, safe_name

__all__ = ["AddResult", "StackSession", "WeightedAccumulator", "safe_name"]
