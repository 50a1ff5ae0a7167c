"""flwr-invariant: the Invariant Aggregator backdoor defense for Flower.

``InvariantAggregation`` here is the ``flwr.server.strategy`` strategy;
``flwr_invariant.serverapp.InvariantAggregation`` is its Message API twin.
The numerical core is ``flwr_invariant.aggregate`` (numpy only).
"""

from .aggregate import and_mask, invariant_aggregate, sign_consistency, trimmed_mean
from .round import InvariantConfig
from .strategy import InvariantAggregation

__all__ = [
    "InvariantAggregation",
    "InvariantConfig",
    "and_mask",
    "invariant_aggregate",
    "sign_consistency",
    "trimmed_mean",
]
__version__ = "0.1.0"
