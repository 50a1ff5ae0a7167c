"""RobustLR (Ozdayi, Kantarcioglu, Gel, "Defending against Backdoors in Federated Learning
with Robust Learning Rate", AAAI 2021)."""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.common.logger import log

from flwr_invariant.aggregate import and_mask

from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["RobustLR", "robust_learning_rates"]


def robust_learning_rates(
    pseudo_gradients: np.ndarray, threshold: int, server_learning_rate: float = 1.0
) -> np.ndarray:
    """Per coordinate ``+eta`` where ``|sum_i sign(g_i)| >= threshold``, else ``-eta``.

    ``(N, P)`` -> ``(P,)`` float32. A zero ``g_i`` casts no vote, so a tie (net
    vote 0) is below any ``threshold >= 1`` and flips. The test is the AND-mask
    with ``tau = threshold / N``, which keeps exactly the integer votes ``>= threshold``.
    """
    agreed = and_mask(pseudo_gradients, threshold / len(pseudo_gradients))
    return np.where(agreed, server_learning_rate, -server_learning_rate).astype(np.float32)


class RobustLR(PseudoGradientStrategy):
    """Server step ``lr * mean_w(g)``: the example-weighted mean of the pseudo-gradients
    (the paper's FedAvg, the authors' default ``--aggr avg``) times the per-coordinate
    learning rate of :func:`robust_learning_rates`.

    Where fewer than ``threshold`` clients (net) agree on the sign, the step is
    reversed, so a backdoor pushed by a few clients is unlearned rather than
    averaged in. With ``threshold = f + 1`` (the registry's choice) the ``f``
    attackers alone never reach it: a coordinate moves their way at ``+eta``
    only if the honest clients' net vote points that way too. ``g_i = w - w_i``
    is minus the authors' update, which changes no ``|sum_i sign|``.

    Differences from the authors' code (``src/aggregation.py``): the rate applies
    to every floating array (theirs: ``model.parameters()`` only, so no
    batch-norm statistics); ``threshold`` is set from ``f`` instead of by hand
    per data set (their runs use 4 for f = 1 of 10, 8 for f = 4 of 40).

    Parameters
    ----------
    threshold : int (default: 1)
        The paper's theta, >= 0; 0 never flips (plain FedAvg times ``eta``).
    server_learning_rate : float (default: 1.0)
        The paper's eta (their code fixes it to 1 with the average).
    """

    def __init__(self, *, threshold: int = 1, server_learning_rate: float = 1.0, **fedavg_kwargs):
        if not threshold >= 0 or not server_learning_rate > 0:
            raise ValueError(
                f"need threshold >= 0, server_learning_rate > 0; got {threshold}, {server_learning_rate}"
            )
        self.threshold = threshold
        self.server_learning_rate = server_learning_rate
        super().__init__(**fedavg_kwargs)

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """The weighted mean with flipped coordinates reversed."""
        count = len(updates.pseudo_gradients)
        if count < self.threshold:
            log(WARNING, "round %s: robust-lr: %d replies cannot reach threshold %d; every coordinate flips",
                updates.server_round, count, self.threshold)  # fmt: skip
        rates = robust_learning_rates(updates.pseudo_gradients, self.threshold, self.server_learning_rate)
        mean = (updates.num_examples / updates.num_examples.sum()) @ updates.pseudo_gradients
        return rates * mean, {"robust_lr_flipped_fraction": float(np.mean(rates < 0))}
