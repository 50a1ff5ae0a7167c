"""Flower's own strategies where they are the paper's algorithm, with bad replies screened.

Each class is the Flower strategy itself (same keyword arguments and behaviour)
with ``ScreenedReplies`` in front: replies with NaN/Inf, wrong shapes or keys,
or undecodable arrays are excluded and reported instead of crashing the round
or poisoning the model. (Weak-DP lives in ``baselines.weak_dp``: Flower's
server-side DP clipping divides by zero when a client returns the unchanged model.)
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    Bulyan,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)

from flwr_invariant.screened_replies import ScreenedReplies

__all__ = [
    "KrumTrimmedMean",
    "ScreenedFedAvg",
    "ScreenedKrum",
    "ScreenedMedian",
    "ScreenedMultiKrum",
    "ScreenedTrimmedMean",
]


class ScreenedFedAvg(ScreenedReplies, FedAvg):
    """FedAvg (McMahan et al., AISTATS 2017): example-weighted mean. Flower's ``FedAvg``."""


class ScreenedKrum(ScreenedReplies, Krum):
    """Krum (Blanchard et al., NeurIPS 2017): the update with the smallest sum of squared
    distances to its ``N - f - 2`` nearest neighbours. Flower's ``Krum``;
    ``num_malicious_nodes`` is ``f``."""


class ScreenedMultiKrum(ScreenedReplies, MultiKrum):
    """Multi-Krum (Blanchard et al., NeurIPS 2017), Euclidean: the mean of the
    ``num_nodes_to_select`` best Krum scores. Flower's ``MultiKrum``."""


class ScreenedTrimmedMean(ScreenedReplies, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018): ``beta`` (default 0.2) of the
    values cut from each tail. Flower's ``FedTrimmedAvg``."""


class ScreenedMedian(ScreenedReplies, FedMedian):
    """Coordinate-wise median (Yin et al., ICML 2018). Flower's ``FedMedian``."""


class KrumTrimmedMean(ScreenedReplies, Bulyan):
    """Krum followed by a trimmed mean: Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018).

    Multi-Krum selects ``N - 2f`` updates, then each coordinate averages the
    ``N - 4f`` values closest to the coordinate-wise median. Needs
    ``N >= 4f + 3`` replies (else the round keeps the model, as Flower's ``Bulyan``).
    """
