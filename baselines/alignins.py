"""AlignIns (Xu, Zhang, Hu, et al., "Detecting Backdoor Attacks in Federated Learning via
Direction Alignment Inspection", CVPR 2025, arXiv 2503.07978)."""

from __future__ import annotations

import numpy as np

from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

__all__ = ["AlignIns", "alignins_admitted", "masked_principal_sign_alignment", "median_z_scores"]


def masked_principal_sign_alignment(updates: np.ndarray, sparsity: float) -> np.ndarray:
    """MPSA: per update, the share of its top-``k`` coordinates (by magnitude) whose sign is
    the principal sign ``sign(sum_i sign(u_i))``; ``k = int(sparsity * P)``. ``(N, P)`` -> ``(N,)``.

    Ties in magnitude at the ``k``-th place are broken by ``np.argpartition``
    (the authors' ``torch.topk`` breaks them its own way).
    """
    updates = np.asarray(updates)
    k = max(1, int(sparsity * updates.shape[1]))
    principal = np.sign(np.sign(updates).sum(axis=0))
    shares = np.empty(len(updates))
    for i, row in enumerate(updates):  # one row at a time: (N, P) index arrays would not fit for large models
        top = np.argpartition(-np.abs(row), k - 1)[:k]
        shares[i] = np.mean(np.sign(row[top]) == principal[top])
    return shares


def median_z_scores(values: np.ndarray) -> np.ndarray:
    """MZ-score ``|x_i - median(x)| / std(x)`` (population std, as the authors' ``np.std``).

    All values equal (std 0) gives 0 for each: none stands out.
    """
    values = np.asarray(values, dtype=np.float64)
    spread = values.std()
    if spread == 0:
        return np.zeros_like(values)
    return np.abs(values - np.median(values)) / spread


def alignins_admitted(
    pseudo_gradients: np.ndarray,
    global_flat: np.ndarray,
    sparsity: float,
    lambda_s: float,
    lambda_c: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the updates whose MZ-scores of MPSA and TDA are below ``lambda_s``/``lambda_c``.

    TDA is the cosine similarity of the update ``u_i = w_i - w = -g_i`` with the
    global weights ``w``. Returns ``(admitted, mpsa, tda)``.
    """
    updates = -np.asarray(pseudo_gradients)
    mpsa = masked_principal_sign_alignment(updates, sparsity)
    global_flat = np.asarray(global_flat, dtype=np.float64)
    dots, norms = np.empty(len(updates)), np.empty(len(updates))
    for i, row in enumerate(updates):  # one float64 row at a time, not a float64 copy of all
        row = row.astype(np.float64)
        dots[i], norms[i] = np.dot(row, global_flat), np.linalg.norm(row)
    norms *= np.linalg.norm(global_flat)
    tda = np.divide(dots, norms, out=np.zeros(len(updates)), where=norms > 0)
    admitted = np.flatnonzero((median_z_scores(mpsa) < lambda_s) & (median_z_scores(tda) < lambda_c))
    return admitted, mpsa, tda


class AlignIns(PseudoGradientStrategy):
    """AlignIns: drop updates whose sign alignment (MPSA) or direction alignment with the
    global model (TDA) is an outlier by MZ-score, clip the rest to their median norm, average.

    Where ours differs from the authors' code (``src/aggregation.py``, ``agg_alignins``):
    ties among the top-``k`` magnitudes may be broken differently; a std of 0 gives
    MZ-score 0 (theirs divides by zero, and a NaN score excludes that update). As
    theirs, the clipping bound is the lower median of the admitted updates' norms
    (``torch.median``), every admitted update is clipped to it and the admitted
    ones are averaged with equal weights; no admitted update leaves the model as it is.

    Parameters (the authors' defaults)
    ----------
    sparsity : float (default: 0.3)
        Share of coordinates (top by magnitude) MPSA looks at, in ``(0, 1]``.
    lambda_s, lambda_c : float (default: 1.0, 1.0)
        MZ-score bounds of MPSA and TDA, > 0.
    """

    def __init__(
        self, *, sparsity: float = 0.3, lambda_s: float = 1.0, lambda_c: float = 1.0, **fedavg_kwargs
    ) -> None:
        if not 0 < sparsity <= 1 or not lambda_s > 0 or not lambda_c > 0:
            raise ValueError(
                f"need 0 < sparsity <= 1, lambda_s > 0, lambda_c > 0; got {sparsity}, {lambda_s}, {lambda_c}"
            )
        self.sparsity = sparsity
        self.lambda_s = lambda_s
        self.lambda_c = lambda_c
        super().__init__(**fedavg_kwargs)

    def __repr__(self) -> str:
        return f"AlignIns(sparsity={self.sparsity}, lambda_s={self.lambda_s}, lambda_c={self.lambda_c})"

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """The mean of the admitted updates, each clipped to their lower median norm."""
        grads = updates.pseudo_gradients
        admitted, _, _ = alignins_admitted(
            grads, updates.global_flat, self.sparsity, self.lambda_s, self.lambda_c
        )
        if admitted.size == 0:
            return np.zeros(grads.shape[1], dtype=np.float32), {"num_admitted": 0, "clip_bound": 0.0}
        norms = np.linalg.norm(grads[admitted], axis=1)
        clip_bound = float(np.sort(norms)[(len(norms) - 1) // 2])  # lower median, as torch.median
        scales = np.minimum(1.0, clip_bound / np.maximum(norms, 1e-12))
        step = (scales[:, None] * grads[admitted]).mean(axis=0).astype(np.float32)
        return step, {"num_admitted": int(admitted.size), "clip_bound": clip_bound}
