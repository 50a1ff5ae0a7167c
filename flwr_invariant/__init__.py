"""flwr-invariant: the Invariant Aggregator backdoor defense for Flower.

``InvariantAggregation`` here is the ``flwr.server.strategy`` strategy;
``flwr_invariant.serverapp.InvariantAggregation`` is its Message API twin.
The algorithm, stated plainly, is ``flwr_invariant.aggregate`` (numpy only); the
fast implementations are in ``flwr_invariant.engines``; the settings and their
defaults in ``flwr_invariant.settings``.
"""

from .aggregate import and_mask, invariant_aggregate, sign_consistency, trimmed_mean
from .settings import InvariantConfig
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
