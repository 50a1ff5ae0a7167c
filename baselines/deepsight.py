"""DeepSight (Rieger, Nguyen, Miettinen, Sadeghi, "DeepSight: Mitigating Backdoor Attacks in
Federated Learning Through Deep Model Inspection", NDSS 2022)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord

from flwr_invariant.extras import require

from .common import pairwise_distances
from .numpy_strategy import PseudoGradientStrategy, RoundUpdates

#: ``probe(arrays) -> (S, n, C)`` the model's softmax outputs on ``n`` fixed random inputs
#: for each of ``S`` seeds, e.g. a :class:`~baselines.server_side.OutputProbe`.
Probe = Callable[[ArrayRecord], np.ndarray]

__all__ = [
    "DeepSight",
    "Probe",
    "clustering_labels",
    "deepsight_accepted",
    "division_differences",
    "normalized_energy_updates",
    "output_layer",
    "threshold_exceedings",
]


def output_layer(shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """Indices of the output layer's weight and bias among the floating layers: the last
    2-D layer followed by a 1-D one of as many entries as it has rows. ``ValueError`` if none."""
    for i in range(len(shapes) - 2, -1, -1):
        if len(shapes[i]) == 2 and shapes[i + 1] == (shapes[i][0],):
            return i, i + 1
    raise ValueError(f"DeepSight: no output layer (a 2-D weight followed by its bias) among shapes {shapes}")


def normalized_energy_updates(weight_updates: np.ndarray, bias_updates: np.ndarray) -> np.ndarray:
    """NEUPs: ``eps_j = sum_k |dW_jk| + |db_j|`` per output neuron, ``NEUP_j = eps_j^2 / sum_l eps_l^2``.

    ``weight_updates``: ``(N, C, K)``; ``bias_updates``: ``(N, C)``. Returns ``(N, C)``;
    a model with no update has all NEUPs 0.
    """
    energy = np.abs(weight_updates).sum(axis=2) + np.abs(bias_updates)
    squared = energy.astype(np.float64) ** 2
    total = squared.sum(axis=1, keepdims=True)
    return np.divide(squared, total, out=np.zeros_like(squared), where=total > 0)


def threshold_exceedings(neups: np.ndarray) -> np.ndarray:
    """Per model, the NEUPs above ``max(0.01, 1/C) * max_j NEUP_j``: ``(N, C)`` -> ``(N,)`` ints."""
    neups = np.asarray(neups)
    factor = max(0.01, 1.0 / neups.shape[1])
    return (neups > factor * neups.max(axis=1, keepdims=True)).sum(axis=1)


def division_differences(local_outputs: np.ndarray, global_outputs: np.ndarray) -> np.ndarray:
    """DDifs: ``DDif_{i,s,c} = mean_n p_i(x_{s,n})_c / p_G(x_{s,n})_c``.

    ``local_outputs``: ``(N, S, n, C)`` softmax outputs of the local models on the
    random inputs of ``S`` seeds; ``global_outputs``: ``(S, n, C)``. Returns ``(N, S, C)``.
    """
    ratio = np.asarray(local_outputs, dtype=np.float64) / np.maximum(global_outputs, 1e-12)[None]
    return ratio.mean(axis=2)


def clustering_labels(features: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """HDBSCAN labels (``min_cluster_size=2``, ``min_samples=1``) with each noise point in a
    cluster of its own. ``features``: ``(N, d)``, or ``(N, N)`` distances with ``"precomputed"``."""
    count = len(features)
    if count < 2:
        return np.zeros(count, dtype=int)
    hdbscan = require("sklearn.cluster", "simulation", "the DeepSight baseline").HDBSCAN
    labels = hdbscan(
        min_cluster_size=2, min_samples=1, metric=metric, allow_single_cluster=True, copy=True
    ).fit_predict(np.maximum(features, 0.0) if metric == "precomputed" else features)
    noise = labels < 0
    labels[noise] = labels.max(initial=-1) + 1 + np.arange(int(noise.sum()))
    return labels


def deepsight_accepted(
    bias_updates: np.ndarray, ddifs: np.ndarray, neups: np.ndarray, tolerance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The models DeepSight accepts, the ensemble clustering's labels and the suspicious flags.

    A model is suspicious when its threshold exceedings are at most half their
    median. Clusterings: cosine distances of the output-bias updates, DDifs of each
    seed, NEUPs; their co-membership (0 same cluster, 1 not) is averaged and
    clustered again. A final cluster is accepted when fewer than ``tolerance`` of
    its models are suspicious. ``bias_updates``: ``(N, C)``; ``ddifs``: ``(N, S, C)``;
    ``neups``: ``(N, C)``.
    """
    exceedings = threshold_exceedings(neups)
    suspicious = exceedings <= np.median(exceedings) / 2
    clusterings = [clustering_labels(pairwise_distances(bias_updates, "cosine"), "precomputed")]
    clusterings += [clustering_labels(ddifs[:, s]) for s in range(ddifs.shape[1])]
    clusterings.append(clustering_labels(neups))
    dissimilarity = np.mean([labels[:, None] != labels[None, :] for labels in clusterings], axis=0)
    final = clustering_labels(dissimilarity, "precomputed")
    accepted = [i for i, label in enumerate(final) if suspicious[final == label].mean() < tolerance]
    return np.array(accepted, dtype=int), final, suspicious


class DeepSight(PseudoGradientStrategy):
    """DeepSight: label each model suspicious or not by its threshold exceedings (how many
    output neurons its update gave notable energy: a backdoor's homogeneous data gives
    few), cluster the models by DDifs, NEUPs and output-bias cosine distances, keep the
    clusters with fewer than ``tolerance`` suspicious models, clip the kept updates to
    the median norm of all updates and average them.

    DDifs need the models' outputs on random inputs: ``probe`` (the simulation's server
    application sets an :class:`~baselines.server_side.OutputProbe`; a round without one
    raises ``RuntimeError``). Written from the paper (Algorithm 1-2, Sec. V): no code by
    the authors was found to compare with. Our reading of details the paper leaves open:
    HDBSCAN with ``min_cluster_size = 2``, ``min_samples = 1``, each noise point its own
    cluster; the co-membership dissimilarities of the clusterings averaged with equal
    weight; clipping to the median L2 norm of all this round's updates (before filtering)
    and an unweighted mean of the accepted ones. The NEUPs and bias updates come from
    the last 2-D floating layer and the 1-D layer after it (the classifier).

    Parameters
    ----------
    tolerance : float (default: 1/3)
        The paper's tau: a cluster is accepted when its share of suspicious models is
        below it; in ``(0, 1]``.
    probe : Probe, optional
        The models' softmax outputs on the random inputs.
    """

    def __init__(self, *, tolerance: float = 1 / 3, probe: Probe | None = None, **fedavg_kwargs) -> None:
        if not 0 < tolerance <= 1:
            raise ValueError(f"tolerance must be in (0, 1], got {tolerance}")
        self.tolerance = tolerance
        self.probe = probe
        super().__init__(**fedavg_kwargs)

    def __repr__(self) -> str:
        return f"DeepSight(tolerance={self.tolerance:.4g}, probe={self.probe!r})"

    def server_step(self, updates: RoundUpdates) -> tuple[np.ndarray, dict[str, float | int]]:
        """The mean of the accepted updates clipped to the median norm."""
        if self.probe is None:
            raise RuntimeError("DeepSight needs the models' outputs on random inputs: set probe")
        grads = updates.pseudo_gradients
        weight_at, bias_at = output_layer(updates.layer_shapes)
        weight_shape = updates.layer_shapes[weight_at]
        weight_updates = grads[:, updates.layer_slices[weight_at]].reshape(len(grads), *weight_shape)
        bias_updates = grads[:, updates.layer_slices[bias_at]]
        neups = normalized_energy_updates(weight_updates, bias_updates)
        global_outputs = self.probe(self._global_arrays)
        local_outputs = np.stack([self.probe(self._local_arrays(updates, g)) for g in grads])
        ddifs = division_differences(local_outputs, global_outputs)
        accepted, final, suspicious = deepsight_accepted(bias_updates, ddifs, neups, self.tolerance)
        norms = np.linalg.norm(grads, axis=1)
        clip_bound = float(np.median(norms))
        metrics = {
            "num_admitted": int(accepted.size),
            "num_suspicious": int(suspicious.sum()),
            "num_clusters": int(len(np.unique(final))),
            "clip_bound": clip_bound,
        }
        if accepted.size == 0:
            return np.zeros(grads.shape[1], dtype=np.float32), metrics
        scales = np.minimum(1.0, clip_bound / np.maximum(norms[accepted], 1e-12))
        return (scales[:, None] * grads[accepted]).mean(axis=0).astype(np.float32), metrics

    def _local_arrays(self, updates: RoundUpdates, pseudo_gradient: np.ndarray) -> ArrayRecord:
        """The local model ``w - g_i`` as arrays (non-floating arrays: the global ones)."""
        local = dict(self._global_arrays.items())
        flat = updates.global_flat - pseudo_gradient
        for name, where, shape in zip(
            updates.layer_names, updates.layer_slices, updates.layer_shapes, strict=True
        ):
            dtype = self._global_arrays[name].numpy().dtype
            local[name] = Array(np.ascontiguousarray(flat[where].reshape(shape), dtype=dtype))
        return ArrayRecord(local)
