"""RFA: robust federated aggregation by the geometric median (Pillutla, Kakade,
Harchaoui, "Robust Aggregation for Federated Learning", IEEE TSP 2022)."""

from __future__ import annotations

import numpy as np

from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["RFA", "geometric_median"]


def geometric_median(
    points: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    max_iterations: int = 4,
    smoothing: float = 1e-6,
    tolerance: float = 1e-5,
) -> tuple[np.ndarray, int]:
    """Smoothed Weiszfeld estimate of ``argmin_z sum_i a_i max(nu, ||z - x_i||)``.

    ``points``: ``(N, P)``; ``weights``: ``(N,)`` non-negative (default equal).
    Starts from the weighted mean and stops after ``max_iterations`` or when the
    objective improves by less than ``tolerance`` (relative). Returns the
    ``(P,)`` estimate and the iterations run.
    """
    points = np.asarray(points)
    alphas = np.ones(len(points)) if weights is None else np.asarray(weights, dtype=np.float64)
    alphas = alphas / alphas.sum()
    median = (alphas @ points).astype(np.float64)

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        distances = np.linalg.norm(points - z.astype(points.dtype), axis=1).astype(np.float64)
        return float(alphas @ np.maximum(distances, smoothing)), distances

    value, distances = objective(median)
    iterations, converged = 0, False
    while iterations < max_iterations and not converged:
        betas = alphas / np.maximum(distances, smoothing)
        median = (betas / betas.sum()) @ points
        new_value, distances = objective(median)
        converged = abs(value - new_value) <= tolerance * max(new_value, smoothing)
        value = new_value
        iterations += 1
    return np.asarray(median, dtype=np.float64), iterations


class RFA(PseudoGradientStrategy):
    """Geometric median of the updates, weighted by examples (smoothed Weiszfeld).

    Parameters (the paper's defaults)
    ----------
    max_iterations : int (default: 4)
        Weiszfeld iterations per round (the paper finds 3-4 enough).
    smoothing : float (default: 1e-6)
        nu, the smoothing that keeps distances away from zero.
    tolerance : float (default: 1e-5)
        Relative objective change that stops the iterations early.
    """

    def __init__(
        self, *, max_iterations: int = 4, smoothing: float = 1e-6, tolerance: float = 1e-5, **fedavg_kwargs
    ):
        if max_iterations < 1 or not smoothing > 0:
            raise ValueError("max_iterations must be >= 1 and smoothing > 0")
        self.max_iterations = max_iterations
        self.smoothing = smoothing
        self.tolerance = tolerance
        super().__init__(**fedavg_kwargs)

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """The geometric median of the pseudo-gradients."""
        median, iterations = geometric_median(
            updates.pseudo_gradients,
            updates.num_examples,
            max_iterations=self.max_iterations,
            smoothing=self.smoothing,
            tolerance=self.tolerance,
        )
        return median, {"weiszfeld_iterations": iterations}
