"""Rules for the AND-mask's decision: which coordinates a round's step may move, and how far.

The paper's rule (``"paper"``) keeps a coordinate when ``|sum_i sign(g_i)| >= tau * N``.
A persistent attacker minority defeats it over tens of rounds: where benign clients
lean one way below ``tau``, the attackers' votes lift the coordinate over the
threshold and the benign values there carry the backdoor (docs/results/attribution).
The other rules change how votes count; each returns, per layer, a step scale in
``[0, 1]`` that multiplies the trimmed mean (the paper's is the 0/1 mask):

- ``"soft-margin"``: where the net vote ``v`` reaches ``k = min_votes(N, tau)``, scale
  ``(v - k + 1) / (N - k + 1)`` (1 when unanimous), so a coordinate a few votes lift over
  ``tau`` moves little;
- ``"collusion"``: votes of clients whose sign vectors agree unusually often are
  shared: client i's vote weighs ``1 / (1 + k_i)``, ``k_i`` the number of others whose
  sign agreement with i is an outlier among the round's pairs (above the median by
  more than ``COLLUSION_SPREAD`` robust standard deviations; :func:`collusion_weights`).
  Colluders that vote as a bloc count about as one client;
- ``"memory"``: votes counted across rounds: the signed vote sums decay by
  ``MEMORY_DECAY`` per round and the mask needs ``|memory| >= tau * (decayed count)``
  as well as this round's paper mask, so a coordinate must lean the same way for
  several rounds;
- ``"bloc-exclusion"``: a client with any unusually similar partner (``k_i >= 1`` above)
  sits the round out, votes and values: the paper's algorithm then runs on the rest, so a
  bloc cannot tip the mask by even one vote nor shift the trimmed mean's ranks
  (:meth:`MaskRule.outside_blocs`);
- ``"departure-exclusion"``: the same exclusion, but the pairwise test compares where clients
  depart from the coordinate-wise median (:func:`departure_agreement`), not their whole sign
  vectors. An attacker that sends honest-looking values on most coordinates
  (``bloc-evasion``) dilutes its agreement with its colluders in the whole vectors; to carry a
  backdoor past the trimmed mean, though, several of them must push the same coordinates the
  same way, and those shared pushes are their largest departures;
- ``"busy-bloc-exclusion"``, ``"busy-departure-exclusion"``: that exclusion, and then a coordinate
  moves only where the remaining clients move it at least as much as they move the layer's typical
  coordinate (its median ``|g_i|`` over clients is at least the layer's median of those;
  :func:`busy_coordinates`). Neurotoxin writes its backdoor where benign clients move least,
  because nothing there overwrites it; this takes that half of every layer away, at little cost
  to the main task, whose steps there are small. The paper's step runs on every coordinate and
  the quiet ones are then put back to the global weights (:func:`hold_quiet_coordinates`);
  ``mask_fraction`` counts the coordinates both the gate and the mask keep;
- ``"persistent-departure-exclusion"``: ``"busy-departure-exclusion"``, and a coordinate is also held
  while its round's extreme departure from the median has leaned the same way round after round
  (:func:`extreme_lean`, remembered with decay ``LEAN_DECAY``; held where the memory is more than
  ``LEAN_Z`` standard deviations of a coin-flip lean from 0). An attacker that no test flags can
  still push a backdoor coordinate a little every round: alone there, its value is the round's
  extreme, and a trimmed mean shifts by one rank toward it. Honest extremes fall on either side;
- ``"cross-round-departure-exclusion"``: ``"busy-departure-exclusion"`` whose pairwise test also
  compares this round's clients with the other clients of the last ``RECALL_ROUNDS`` rounds
  (:meth:`MaskRule.outside_blocs` with client ids; a client is never compared with its own past).
  Colluders that share a backdoor's coordinates out so that no two depart together in a round
  (``split-evasion``) still depart where their predecessors of the same share did;
- ``"record-departure-exclusion"``: ``"cross-round-departure-exclusion"``, and a record per client id
  of the rounds it took part in and the rounds that test flagged it: a client flagged unusually
  often (:func:`unusual_records`) sits out every round from then on. Attackers stand out most while
  the backdoor is not yet learned; once it is partly in, their updates look like everyone's and a
  test of one round stops finding them, but their record keeps them out;
- ``"record-partial-exclusion"``: ``"record-departure-exclusion"``, but a client this round's test
  flags, and its record has not excluded, sits out only on its largest departures, the coordinates
  the test compared (:meth:`MaskRule.without_departures`: there its values are the global weights, so
  it casts no vote and steps 0); the rest of its update counts. About half of a round's flagged
  clients are honest, and excluding them whole is where the exclusion rules lose accuracy
  (docs/results/README.md); a bloc's shared push is in those largest departures, and a client the
  test flags round after round is still excluded whole by its record;
- ``"record-repeat-exclusion"``: ``"record-partial-exclusion"``, but a client the test also flagged
  the last round it took part in sits out whole. Partial exclusion let a black-box pool's backdoor
  through before the record caught it (docs/results/screen_partial_exclusion): an attacker is
  flagged every round it takes part in, an honest client in a quarter to a third of its rounds, so a repeated
  flag leaves the attackers out whole from their second round on and most honest clients in part.

No Flower import. Shapes: ``stacked`` is ``(N, *layer_shape)``; scales are ``layer_shape``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from .aggregate import and_mask, min_votes, sign_votes

__all__ = [
    "CLIENT_SELECTING_RULES",
    "COLLUSION_SPREAD",
    "CROSS_ROUND_RULES",
    "DEPARTURE_SHARE",
    "DEPARTURE_TESTING_RULES",
    "LEAN_DECAY",
    "LEAN_HOLDING_RULES",
    "LEAN_Z",
    "MASK_RULES",
    "MEMORY_KEEPING_RULES",
    "MEMORY_DECAY",
    "MaskRule",
    "PAPER_STEP_RULES",
    "PARTIAL_EXCLUDING_RULES",
    "QUIET_HOLDING_RULES",
    "RECALL_ROUNDS",
    "RECORD_ALPHA",
    "RECORD_KEEPING_RULES",
    "RECORD_MIN_SAMPLED",
    "REPEAT_EXCLUDING_RULES",
    "binomial_tail",
    "busy_coordinates",
    "collusion_weights",
    "departure_agreement",
    "departure_signs",
    "extreme_lean",
    "hold_quiet_coordinates",
    "outlier_threshold",
    "sign_agreement",
    "unusual_records",
    "weighted_consistency",
]

#: Rules that keep a record of each client's flags and exclude the unusual (:attr:`MaskRule.flag_record`).
RECORD_KEEPING_RULES = ("record-departure-exclusion", "record-partial-exclusion", "record-repeat-exclusion")
MASK_RULES = (
    "paper", "soft-margin", "collusion", "memory",
    "bloc-exclusion", "departure-exclusion", "busy-bloc-exclusion", "busy-departure-exclusion",
    "persistent-departure-exclusion", "cross-round-departure-exclusion", *RECORD_KEEPING_RULES,
)  # fmt: skip
#: Rules that pick the round's clients (:meth:`MaskRule.outside_blocs`) before the step.
CLIENT_SELECTING_RULES = (
    "bloc-exclusion", "departure-exclusion", "busy-bloc-exclusion", "busy-departure-exclusion",
    "persistent-departure-exclusion", "cross-round-departure-exclusion", *RECORD_KEEPING_RULES,
)  # fmt: skip
#: Rules whose exclusion test compares the clients' largest departures (:func:`departure_agreement`).
DEPARTURE_TESTING_RULES = (
    "departure-exclusion", "busy-departure-exclusion", "persistent-departure-exclusion",
    "cross-round-departure-exclusion", *RECORD_KEEPING_RULES,
)  # fmt: skip
#: Rules that then hold the quiet coordinates (:func:`hold_quiet_coordinates`).
QUIET_HOLDING_RULES = (
    "busy-bloc-exclusion", "busy-departure-exclusion", "persistent-departure-exclusion",
    "cross-round-departure-exclusion", *RECORD_KEEPING_RULES,
)  # fmt: skip
#: Rules whose departure test also compares the clients of recent rounds (needs client ids).
CROSS_ROUND_RULES = ("cross-round-departure-exclusion", *RECORD_KEEPING_RULES)
#: Rules that exclude a flagged client only on its largest departures (:meth:`MaskRule.without_departures`).
PARTIAL_EXCLUDING_RULES = ("record-partial-exclusion", "record-repeat-exclusion")
#: Of those, the rules that exclude a client whole when the test flagged it the last round it took part in.
REPEAT_EXCLUDING_RULES = ("record-repeat-exclusion",)
#: Rules that also hold coordinates whose extreme departures lean one way (:meth:`MaskRule.steady_leans`).
LEAN_HOLDING_RULES = ("persistent-departure-exclusion",)
#: Rules that keep a memory across rounds (:attr:`MaskRule.memory_state`; checkpointed).
MEMORY_KEEPING_RULES = ("memory", *LEAN_HOLDING_RULES)
#: Rules whose step is the paper's (on the clients and coordinates they pick): the fast engines compute it.
PAPER_STEP_RULES = ("paper", *CLIENT_SELECTING_RULES)
COLLUSION_SPREAD = 3.0  # robust standard deviations above the median pair agreement
MEMORY_DECAY = 0.5  # weight of the previous rounds' votes
DEPARTURE_SHARE = 0.1  # of each layer's coordinates: a client's largest departures from the median
LEAN_DECAY = 0.95  # weight of the previous rounds' leans: a memory of about 20 rounds
RECALL_ROUNDS = 3  # rounds whose clients the cross-round test remembers
LEAN_Z = 4.0  # standard deviations of a coin-flip lean's memory; about 6e-5 of them pass it
RECORD_ALPHA = 1e-3  # chance that a client flagged at the typical rate has a record as unusual
RECORD_MIN_SAMPLED = 5  # rounds a client takes part in before its record is judged
RECORD_FIELDS = 4  # a client's record: rounds taken part, flagged, excluded for good, flagged the last one


@threadpool_limits.wrap(limits=1, user_api="blas")
def _exact_gram(signs: np.ndarray, others: np.ndarray | None = None) -> np.ndarray:
    """``signs @ others.T`` (default ``others = signs``) in float64 for arrays of -1, 0 and 1, summed exactly.

    ``signs`` ``(N, P)``, ``others`` ``(M, P)``, any numeric dtype. float32 products of whole numbers
    stay exact while each partial sum is below 2**24, so the product runs in float32 (half the
    memory of float64) over chunks of 2**22 columns. One BLAS thread: with N rows and millions of
    columns, OpenBLAS's threads wait on each other, and on a loaded machine (a simulation's
    clients) a product took 50-90x longer.
    """
    rows = signs.shape[0] if others is None else others.shape[0]
    total = np.zeros((signs.shape[0], rows))
    for start in range(0, signs.shape[1], 1 << 22):
        columns = slice(start, start + (1 << 22))
        part = signs[:, columns].astype(np.float32, copy=False)
        other = part if others is None else others[:, columns].astype(np.float32, copy=False)
        total += part @ other.T
    return total


def sign_agreement(layers: Iterable[np.ndarray]) -> tuple[np.ndarray, int]:
    """``(N, N)`` mean of ``sign(x_i) * sign(x_j)`` over every coordinate of ``layers``, and their count.

    ``layers``: each ``(N, *layer_shape)`` (a generator works). Sums layer by layer, so memory
    stays at one layer's signs.
    """
    total, count = None, 0
    for layer in layers:
        num_clients = layer.shape[0]
        if total is None:
            total = np.zeros((num_clients, num_clients))
        signs = np.sign(np.asarray(layer).reshape(num_clients, -1)).astype(np.float32, copy=False)
        total += _exact_gram(signs)
        count += signs.shape[1]
    if total is None:
        raise ValueError("sign_agreement needs at least one layer")
    return total / max(count, 1), count


def _departure_signs(flat: np.ndarray, share: float) -> tuple[np.ndarray, int]:
    """float32 ``(N, P)``: ``sign(x_i - median)`` on row i's ``ceil(share * P)`` largest departures, else 0.

    ``flat``: ``(N, P)``, one layer. Also returns that count of kept coordinates per row.
    """
    flat = np.asarray(flat, dtype=np.float32)
    low, high = _middle_values(flat)
    signs = flat - (low + high) / 2  # the departures, overwritten row by row with their signs
    kept = max(1, int(np.ceil(share * flat.shape[1])))
    for row in signs:  # row by row: argpartition over all rows would hold N x P int64 indices
        largest = np.argpartition(-np.abs(row), kept - 1)[:kept]
        departed = np.sign(row[largest])
        row[:] = 0.0
        row[largest] = departed
    return signs, kept


def departure_agreement(
    layers: Iterable[np.ndarray], share: float = DEPARTURE_SHARE
) -> tuple[np.ndarray, int]:
    """``(N, N)`` agreement of the clients' largest departures from the median, and the count compared.

    Per layer of ``P`` coordinates, client i departs by ``d_i = x_i - median_j(x_j)``; its
    departure signs ``s_i`` are ``sign(d_i)`` on its ``ceil(share * P)`` largest ``|d_i|`` and 0
    elsewhere. Returns ``sum over layers of s_i . s_j`` divided by the coordinates each client
    keeps over all layers (1: two clients depart the same way on the same coordinates; near 0
    for independent clients), and that count. ``layers``: each ``(N, *layer_shape)``.
    """
    total, count = None, 0
    for layer in layers:
        num_clients = layer.shape[0]
        if total is None:
            total = np.zeros((num_clients, num_clients))
        signs, kept = _departure_signs(np.asarray(layer).reshape(num_clients, -1), share)
        total += _exact_gram(signs)
        count += kept
    if total is None:
        raise ValueError("departure_agreement needs at least one layer")
    return total / count, count


def departure_signs(layers: Iterable[np.ndarray], share: float = DEPARTURE_SHARE) -> tuple[np.ndarray, int]:
    """int8 ``(N, P)``: every layer's departure signs (:func:`departure_agreement`) side by side.

    ``P``: all coordinates of ``layers``; also returns the count kept per client over all layers.
    """
    pieces, count = [], 0
    for layer in layers:
        signs, kept = _departure_signs(np.asarray(layer).reshape(layer.shape[0], -1), share)
        pieces.append(signs.astype(np.int8))
        count += kept
    if not pieces:
        raise ValueError("departure_signs needs at least one layer")
    return np.concatenate(pieces, axis=1), count


def outlier_threshold(pairs: np.ndarray, num_coordinates: int, spread: float = COLLUSION_SPREAD) -> float:
    """The agreement above which a pair stands out among ``pairs`` (agreements over ``num_coordinates``).

    The median pair plus ``spread`` times the larger of the pairs' robust standard deviation
    (1.4826 MAD) and ``1 / sqrt(num_coordinates)``, the chance spread of independent sign vectors
    (so a few coordinates never single out a pair).
    """
    centre = np.median(pairs)
    scale = max(1.4826 * np.median(np.abs(pairs - centre)), 1.0 / np.sqrt(max(num_coordinates, 1)))
    return float(centre + spread * scale)


def collusion_weights(
    agreement: np.ndarray, num_coordinates: int, spread: float = COLLUSION_SPREAD
) -> np.ndarray:
    """``(N,)`` vote weights ``1 / (1 + k_i)`` from an ``(N, N)`` agreement matrix over ``num_coordinates``.

    ``k_i``: clients j != i whose agreement with i stands out among the round's pairs
    (:func:`outlier_threshold`). All weights are 1 when no pair stands out.
    """
    num_clients = agreement.shape[0]
    if num_clients < 3:
        return np.ones(num_clients)
    outlying = agreement > outlier_threshold(
        agreement[np.triu_indices(num_clients, 1)], num_coordinates, spread
    )
    np.fill_diagonal(outlying, False)
    return 1.0 / (1.0 + outlying.sum(axis=1))


def busy_coordinates(stacked: np.ndarray) -> np.ndarray:
    """Bool of ``stacked.shape[1:]``: True where ``median_i |x_i|`` is at least its median over the layer.

    ``stacked``: ``(N, *layer_shape)``. The coordinates the clients move most keep their step;
    ties at the layer's median are kept, so at least half the coordinates are.
    """
    stacked = np.asarray(stacked)
    low, high = _middle_values(stacked.reshape(stacked.shape[0], -1), absolute=True)
    medians = (low.astype(np.float64) + high) / 2
    return (medians >= np.median(medians)).reshape(stacked.shape[1:])


def extreme_lean(stacked: np.ndarray) -> np.ndarray:
    """int8 of ``stacked.shape[1:]``: +1 where the farthest value from the median lies above it, -1 below.

    ``stacked``: ``(N, *layer_shape)``. The sign of ``max + min - 2 * median`` over the N clients
    (0 on a tie). Symmetric spreads of values give either sign by chance.
    """
    stacked = np.asarray(stacked)
    flat = stacked.reshape(stacked.shape[0], -1)
    low, high = _middle_values(flat)
    skew = flat.max(axis=0).astype(np.float64) + flat.min(axis=0) - low - high
    return np.sign(skew).astype(np.int8).reshape(stacked.shape[1:])


def _middle_values(flat: np.ndarray, absolute: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The two middle order statistics over the N rows of ``flat`` ``(N, P)``, each ``(P,)``.

    Their float32 mean is ``np.median(flat, axis=0)`` bit for bit; ``absolute`` ranks ``|flat|``.
    """
    num_clients = flat.shape[0]
    # Each coordinate's N values side by side, sorted: numpy's SIMD sort of short contiguous rows
    # is about 4-8x faster than np.median's partition along axis 0 (20 x 2.4 M float32).
    columns = np.empty(flat.shape[::-1], dtype=flat.dtype)
    if absolute:
        np.abs(flat.T, out=columns)
    else:
        columns[...] = flat.T
    columns.sort(axis=1)
    return columns[:, (num_clients - 1) // 2], columns[:, num_clients // 2]


def hold_quiet_coordinates(
    global_weights: Sequence[np.ndarray],
    stepped: Sequence[np.ndarray],
    stacks: Iterable[tuple[int, np.ndarray]],
    tau: float,
    also_held: Mapping[int, np.ndarray] | None = None,
) -> tuple[list[np.ndarray], float]:
    """``stepped`` with every coordinate outside :func:`busy_coordinates` put back to the global weight.

    ``stepped``: the new weights of the paper's step on the same clients; ``stacks``: ``(l,
    (N, *shape))`` pseudo-gradients of the layers to gate (other layers pass through);
    ``also_held``: layer index -> bool of its shape, more coordinates to put back. The step
    is coordinate-wise, so this equals stepping from updates held at the global weights there.
    Also returns the share of the gated coordinates that the gate, ``also_held`` and the AND-mask
    at ``tau`` all keep (1.0 if there are none).
    """
    held, kept, total = list(stepped), 0, 0
    for index, stacked in stacks:
        moving = busy_coordinates(stacked)
        if also_held is not None:
            moving &= ~also_held[index]
        held[index] = np.where(moving, stepped[index], global_weights[index])
        kept += int(np.count_nonzero(moving & and_mask(stacked, tau)))
        total += moving.size
    return held, (kept / total if total else 1.0)


def binomial_tail(count: int, trials: int, rate: float) -> float:
    """``P(X >= count)`` for ``X ~ Binomial(trials, rate)``, ``0 < rate < 1`` (summed in log space)."""
    log_rate, log_miss = math.log(rate), math.log1p(-rate)
    return sum(
        math.exp(
            math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
            + k * log_rate + (trials - k) * log_miss
        )
        for k in range(max(count, 0), trials + 1)
    )  # fmt: skip


def unusual_records(
    sampled: np.ndarray,
    flagged: np.ndarray,
    alpha: float = RECORD_ALPHA,
    min_sampled: int = RECORD_MIN_SAMPLED,
) -> np.ndarray:
    """``(K,)`` bool: the clients flagged unusually often, from ``(K,)`` counts of rounds taken part, flagged.

    The typical rate ``p`` is the median over the clients with at least ``min_sampled`` rounds (at
    least 3 of them, else no client is unusual) of Jeffreys' estimate ``(flagged + 1/2) / (sampled +
    1)``, never 0 or 1; client k is unusual when ``sampled_k >= min_sampled`` and a client flagged at
    rate ``p`` would be flagged ``flagged_k`` times or more with probability at most ``alpha``
    (:func:`binomial_tail`). The median, not the pooled rate, so a minority flagged in most rounds
    does not raise the bar it is judged by.
    """
    sampled, flagged = np.asarray(sampled, dtype=np.int64), np.asarray(flagged, dtype=np.int64)
    judged = sampled >= min_sampled
    if judged.sum() < 3:
        return np.zeros(sampled.shape, dtype=bool)
    rate = float(np.median((flagged[judged] + 0.5) / (sampled[judged] + 1.0)))
    return np.array(
        [
            bool(is_judged) and binomial_tail(int(f), int(n), rate) <= alpha
            for is_judged, f, n in zip(judged, flagged, sampled, strict=True)
        ],
        dtype=bool,
    )


def weighted_consistency(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``|sum_i w_i sign(x_i)| / sum_i w_i`` per coordinate, float64 of ``stacked.shape[1:]``."""
    signs = np.sign(np.asarray(stacked)).astype(np.float64)
    return np.abs(np.tensordot(weights, signs, axes=1)) / weights.sum()


class MaskRule:
    """Step scales of one rule; ``scales`` is called once per round with every masked layer.

    Parameters
    ----------
    name : str
        One of :data:`MASK_RULES`.
    tau : float
        Sign-consistency threshold in ``[0, 1]``.
    """

    def __init__(self, name: str, tau: float) -> None:
        if name not in MASK_RULES:
            raise ValueError(f"mask_rule must be one of {', '.join(MASK_RULES)}; got {name!r}")
        self.name, self.tau = name, tau
        self._memory: list[np.ndarray] | None = None
        self._memory_count = 0.0
        self._restored: np.ndarray | None = None  # memory_state set before the layer shapes are known
        self._recalled: dict[Hashable, np.ndarray] = {}  # client id -> int8 [rounds ago, *departure signs]
        self._record: dict[Hashable, np.ndarray] = {}  # client id -> int64 [sampled, flagged, excluded, last]
        # partial rules only: this round's departure signs, (N, P)
        self._departures = np.zeros((0, 0), dtype=np.int8)
        self._partly_excluded = np.zeros(0, dtype=bool)  # this round's clients left out on their departures

    @property
    def memory_state(self) -> np.ndarray | None:
        """The memory of a :data:`MEMORY_KEEPING_RULES` rule (``None`` before the first round or for others).

        1-D float64, then each masked layer's memory flattened in layer order: for ``"memory"``
        the decayed vote count and the decayed vote sums; for the lean-holding rules the
        decayed sum of squared weights (a coin-flip lean's memory variance) and the decayed
        leans. Setting it (e.g. from a checkpoint) continues from there.
        """
        if self._restored is not None:
            return self._restored
        if self._memory is None:
            return None
        return np.concatenate([[self._memory_count], *(m.ravel() for m in self._memory)])

    @memory_state.setter
    def memory_state(self, state: np.ndarray | None) -> None:
        self._memory, self._memory_count = None, 0.0
        self._restored = None if state is None else np.asarray(state, dtype=np.float64).ravel().copy()

    def scales(self, layers: Sequence[np.ndarray]) -> tuple[list[np.ndarray], dict[str, float]]:
        """Per layer, the step scale (float64, ``layer_shape``) of the stacked pseudo-gradients.

        ``layers``: each ``(N, *layer_shape)``, the same N clients. Also returns metrics
        (``min_vote_weight`` for ``"collusion"``).
        """
        if self.name == "paper":
            return [and_mask(layer, self.tau).astype(np.float64) for layer in layers], {}
        if self.name == "soft-margin":
            result = []
            for layer in layers:
                num_clients = layer.shape[0]
                needed = min_votes(num_clients, self.tau)
                margin = sign_votes(layer) - (needed - 1)  # 1 at the threshold, N - k + 1 when unanimous
                result.append(np.clip(margin / (num_clients - needed + 1), 0.0, 1.0))
            return result, {}
        if self.name in PAPER_STEP_RULES:
            raise ValueError(f"mask_rule {self.name!r} runs the paper's step (an engine), not scales")
        if self.name == "collusion":
            weights = collusion_weights(*sign_agreement(layers))
            scales = [
                (weighted_consistency(layer, weights) >= self.tau).astype(np.float64) for layer in layers
            ]
            return scales, {"min_vote_weight": float(weights.min())}
        return self._memory_scales(layers), {}

    @property
    def recalled_departures(self) -> dict[Hashable, np.ndarray]:
        """The cross-round test's memory: client id -> int8 ``[rounds ago, *departure signs]``.

        Empty before the first round and for other rules; setting it (e.g. from a checkpoint)
        continues from there.
        """
        return dict(self._recalled)

    @recalled_departures.setter
    def recalled_departures(self, recalled: Mapping[Hashable, np.ndarray]) -> None:
        self._recalled = {key: np.asarray(value, dtype=np.int8) for key, value in recalled.items()}

    @property
    def flag_record(self) -> dict[Hashable, np.ndarray]:
        """Record rules' memory: client id -> int64 ``[rounds taken part, flagged, excluded, last]``.

        ``excluded`` is 1 once the record stood out (:func:`unusual_records`): the client sits out
        every later round; ``last`` is 1 if the test flagged it the last round it took part in.
        Empty before the first round and for other rules; setting it (e.g. from a checkpoint)
        continues from there (a record saved without ``last`` reads it as 0).
        """
        return {key: value.copy() for key, value in self._record.items()}

    @flag_record.setter
    def flag_record(self, record: Mapping[Hashable, np.ndarray]) -> None:
        self._record = {
            key: np.pad(np.asarray(value, dtype=np.int64), (0, RECORD_FIELDS - len(value)))
            for key, value in record.items()
        }

    def outside_blocs(
        self, layers: Iterable[np.ndarray], client_ids: Sequence[Hashable] | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """``(N,)`` bool: the clients with no unusually similar partner (:func:`collusion_weights` = 1).

        ``layers``: each ``(N, *layer_shape)``, the same N clients' pseudo-gradients. Similarity is
        :func:`departure_agreement` for :data:`DEPARTURE_TESTING_RULES`, else
        :func:`sign_agreement`; :data:`CROSS_ROUND_RULES` also look for partners among the other
        clients of the last ``RECALL_ROUNDS`` rounds, which needs ``client_ids`` (N stable ids, e.g.
        node ids); :data:`RECORD_KEEPING_RULES` also leave out the clients whose record stands out
        (:meth:`_excluded_by_record`). :data:`PARTIAL_EXCLUDING_RULES` keep the flagged clients whose
        record has not excluded them, to be left out on their largest departures only
        (:meth:`without_departures`), and :data:`REPEAT_EXCLUDING_RULES` of those only the ones the
        test did not also flag the last round they took part in. Also returns ``num_bloc_excluded``
        (flagged this round) and, for record-keeping rules, ``num_record_excluded`` (left out by
        their record alone) and ``num_record_banned`` (every client excluded for good so far), and
        for partially excluding rules ``num_partly_excluded``, and ``num_kept``. When the
        exclusions leave fewer than 2 of 2 or more clients, none is kept and the round makes no step
        (:meth:`~flwr_invariant.settings.InvariantConfig.aggregate`): one client's update is no robust
        aggregate, and a client its record excluded must never count again (keeping every client
        instead let a round of 10 attackers in 20, all flagged, write a backdoor:
        docs/results/README.md, "No step without two clients").
        """
        if self.name in CROSS_ROUND_RULES:
            flagged = self._partnered_across_rounds(layers, client_ids)
        else:
            similarity = departure_agreement if self.name in DEPARTURE_TESTING_RULES else sign_agreement
            flagged = collusion_weights(*similarity(layers)) < 1.0
        metrics: dict[str, float] = {"num_bloc_excluded": int(flagged.sum())}
        partial = self.name in PARTIAL_EXCLUDING_RULES
        outside = np.ones_like(flagged) if partial else ~flagged
        if self.name in RECORD_KEEPING_RULES:
            if self.name in REPEAT_EXCLUDING_RULES:
                outside &= ~(flagged & self._flagged_last_time(client_ids))
            by_record = self._excluded_by_record(client_ids, flagged)
            outside &= ~by_record
            metrics["num_record_excluded"] = int((by_record & ~flagged).sum())
            metrics["num_record_banned"] = sum(int(value[2]) for value in self._record.values())
        if partial:
            self._partly_excluded = flagged & outside
            metrics["num_partly_excluded"] = int(self._partly_excluded.sum())
        if outside.sum() < 2 <= len(outside):
            outside = np.zeros_like(outside)
        metrics["num_kept"] = int(outside.sum())
        return outside, metrics

    def without_departures(
        self,
        global_weights: Sequence[np.ndarray],
        updates: Sequence[Sequence[np.ndarray]],
        tested_layers: Sequence[int],
    ) -> list[Sequence[np.ndarray]]:
        """``updates`` with the partly excluded clients' largest departures put back to ``global_weights``.

        Call after :meth:`outside_blocs` on the same round's ``updates`` (client i's arrays, the
        layer shapes of ``global_weights``); ``tested_layers``: the indices of the layers it was
        given, in order. The other clients' updates are returned as they are; inputs are not modified.
        """
        if len(self._partly_excluded) != len(updates):
            raise ValueError(
                f"without_departures got {len(updates)} updates; "
                f"the round's test saw {len(self._partly_excluded)}"
            )
        result = list(updates)
        for row in np.flatnonzero(self._partly_excluded):
            departed, update, start = self._departures[row] != 0, list(updates[row]), 0
            for index in tested_layers:
                w = global_weights[index]
                held = departed[start : start + w.size].reshape(w.shape)
                update[index] = np.where(held, w, np.asarray(update[index], dtype=w.dtype))
                start += w.size
            result[row] = update
        return result

    def _flagged_last_time(self, client_ids: Sequence[Hashable]) -> np.ndarray:
        """``(N,)`` bool: the round's clients the test flagged the last round they took part in."""
        return np.array([key in self._record and self._record[key][3] == 1 for key in client_ids], dtype=bool)

    def _excluded_by_record(self, client_ids: Sequence[Hashable], flagged: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: the round's clients whose record stands out, this round's flags counted.

        Adds the round to every client's record; a client once unusual stays excluded.
        """
        for key, hit in zip(client_ids, flagged, strict=True):
            sampled, times, banned, _ = self._record.get(key, np.zeros(RECORD_FIELDS, dtype=np.int64))
            self._record[key] = np.array([sampled + 1, times + int(hit), banned, int(hit)], dtype=np.int64)
        keys = list(self._record)
        counts = np.stack([self._record[key] for key in keys])
        unusual = unusual_records(counts[:, 0], counts[:, 1])
        for key, now in zip(keys, unusual, strict=True):
            if now:
                self._record[key][2] = 1
        return np.array([self._record[key][2] == 1 for key in client_ids])

    def _partnered_across_rounds(
        self, layers: Iterable[np.ndarray], client_ids: Sequence[Hashable] | None
    ) -> np.ndarray:
        """``(N,)`` bool: a partner stands out in this round or among the recalled clients.

        Then remembers this round's clients (their departure signs) and forgets rounds older than
        ``RECALL_ROUNDS``.
        """
        signs, count = departure_signs(layers)
        if self.name in PARTIAL_EXCLUDING_RULES:  # the others need no (N, P) signs after the round
            self._departures = signs
        if client_ids is None or len(client_ids) != len(signs):
            raise ValueError(
                f"mask_rule {self.name!r} needs one id per client to compare them across rounds; "
                f"got {'none' if client_ids is None else len(client_ids)} for {len(signs)} clients"
            )
        ids = list(client_ids)
        recalled = [memory[1:] for key, memory in self._recalled.items() if key not in ids]
        within = _exact_gram(signs) / count
        across = _exact_gram(signs, np.stack(recalled)) / count if recalled else np.zeros((len(ids), 0))
        pairs = np.concatenate([within[np.triu_indices(len(ids), 1)], across.ravel()])
        partnered = np.zeros(len(ids), dtype=bool)
        if pairs.size >= 3:
            limit = outlier_threshold(pairs, count)
            np.fill_diagonal(within, -np.inf)
            partnered = (within > limit).any(axis=1) | (across > limit).any(axis=1)
        remembered = {
            key: np.concatenate([[memory[0] + 1], memory[1:]]).astype(np.int8)
            for key, memory in self._recalled.items()
            if memory[0] < RECALL_ROUNDS
        }
        for key, row in zip(ids, signs, strict=True):
            remembered[key] = np.concatenate([[1], row]).astype(np.int8)
        self._recalled = remembered
        return partnered

    def steady_leans(
        self, stacks: Iterable[tuple[int, np.ndarray]]
    ) -> tuple[dict[int, np.ndarray], dict[str, float]]:
        """Layer index -> bool of its shape: the coordinates whose extreme departure keeps one side.

        ``stacks``: ``(l, (N, *shape))`` pseudo-gradients of this round's clients, every masked
        layer once per round, in layer order. Adds this round's :func:`extreme_lean` to the
        decayed memory and holds where ``|memory| >= LEAN_Z * sqrt(sum of squared weights)``.
        Also returns ``lean_held_fraction``, the share of the coordinates held.
        """
        leans = {index: extreme_lean(stacked) for index, stacked in stacks}
        if self._restored is not None:
            self._unpack_restored([lean.shape for lean in leans.values()])
        if self._memory is None or [m.shape for m in self._memory] != [lean.shape for lean in leans.values()]:
            self._memory = [np.zeros(lean.shape) for lean in leans.values()]
            self._memory_count = 0.0
        self._memory = [LEAN_DECAY * m + lean for m, lean in zip(self._memory, leans.values(), strict=True)]
        self._memory_count = LEAN_DECAY**2 * self._memory_count + 1.0
        limit = LEAN_Z * np.sqrt(self._memory_count)
        held = {index: np.abs(m) >= limit for index, m in zip(leans, self._memory, strict=True)}
        total = sum(h.size for h in held.values())
        fraction = sum(int(np.count_nonzero(h)) for h in held.values()) / total if total else 0.0
        return held, {"lean_held_fraction": fraction}

    def _memory_scales(self, layers: Sequence[np.ndarray]) -> list[np.ndarray]:
        sums = [np.sign(layer).sum(axis=0, dtype=np.float64) for layer in layers]
        count = float(layers[0].shape[0])
        if self._restored is not None:
            self._unpack_restored([s.shape for s in sums])
        if self._memory is None or [m.shape for m in self._memory] != [s.shape for s in sums]:
            self._memory, self._memory_count = [np.zeros_like(s) for s in sums], 0.0
        self._memory = [MEMORY_DECAY * m + s for m, s in zip(self._memory, sums, strict=True)]
        self._memory_count = MEMORY_DECAY * self._memory_count + count
        needed = min_votes(layers[0].shape[0], self.tau)  # this round's paper mask: |sum| >= needed
        return [
            (
                (np.abs(s) >= needed)
                & (np.abs(m) >= self.tau * self._memory_count)
                & (np.sign(m) == np.sign(s))
            ).astype(np.float64)
            for m, s in zip(self._memory, sums, strict=True)
        ]

    def _unpack_restored(self, shapes: list[tuple[int, ...]]) -> None:
        state, self._restored = self._restored, None
        sizes = [int(np.prod(shape)) for shape in shapes]
        if state.size != 1 + sum(sizes):
            raise ValueError(
                f"mask memory state holds {state.size - 1} coordinates; "
                f"the masked layers of this round have {sum(sizes)}"
            )
        pieces = np.split(state[1:], np.cumsum(sizes)[:-1])
        self._memory = [piece.reshape(shape) for piece, shape in zip(pieces, shapes, strict=True)]
        self._memory_count = float(state[0])
