"""Competing defenses as Flower Message API strategies, selectable by name.

Flower's own strategy is used wherever it is the same algorithm (FedAvg, Krum,
Multi-Krum, trimmed mean, median, and Bulyan for Krum + trimmed mean); the rest
are numpy functions beside thin strategies.
Every strategy screens out bad client replies first, like ``InvariantAggregation``.
"""

from .registry import DEFENSES, assumed_malicious, defense_names

__all__ = ["DEFENSES", "assumed_malicious", "defense_names"]
