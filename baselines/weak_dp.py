"""Weak differential privacy (Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor
Federated Learning?", arXiv 1911.07963, 2019)."""

from __future__ import annotations

import numpy as np

from .common import clip_rows
from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["WeakDP"]


class WeakDP(PseudoGradientStrategy):
    """Norm bounding plus Gaussian noise: clip each update to L2 norm ``clipping_norm``,
    take the example-weighted mean, add noise of std ``noise_std`` to every coordinate.

    Written here rather than wrapping Flower's
    ``DifferentialPrivacyServerSideFixedClipping``: in flwr 1.41 its clipping
    divides by zero when a client returns the unchanged model, and its noise
    comes from numpy's unseeded global generator.

    Parameters (Sun et al.'s EMNIST values)
    ----------
    clipping_norm : float (default: 3.0)
    noise_std : float (default: 0.025)
    seed : int, optional
        Seed of the server's noise generator.
    """

    #: Attributes that carry across rounds (saved in a round checkpoint): the noise generator.
    carried_state = ("rng",)

    def __init__(
        self,
        *,
        clipping_norm: float = 3.0,
        noise_std: float = 0.025,
        seed: int | None = None,
        **fedavg_kwargs,
    ):
        if not clipping_norm > 0 or noise_std < 0:
            raise ValueError(
                f"clipping_norm must be > 0 and noise_std >= 0; got {clipping_norm}, {noise_std}"
            )
        self.clipping_norm = clipping_norm
        self.noise_std = noise_std
        self.rng = np.random.default_rng(seed)
        super().__init__(**fedavg_kwargs)

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """Weighted mean of the clipped pseudo-gradients, plus noise."""
        clipped = clip_rows(updates.pseudo_gradients, self.clipping_norm)
        mean = (updates.num_examples / updates.num_examples.sum()) @ clipped
        noise = self.rng.normal(0.0, self.noise_std, size=mean.shape) if self.noise_std else 0.0
        norms = np.linalg.norm(updates.pseudo_gradients, axis=1)
        return mean + noise, {"num_clipped": int(np.sum(norms > self.clipping_norm))}
