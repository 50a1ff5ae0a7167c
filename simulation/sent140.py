"""Sentiment140 with the Greek-director edge case: the paper's text task ("Twitter").

Sentiment140 (Go, Bhayani, Huang 2009): 1.6M tweets labelled by emoticons, in
``<data-root>/sentiment140/training.1600000.processed.noemoticon.csv`` (latin-1,
six quoted columns: polarity 0/4, id, date, query, user, text), from
http://help.sentiment140.com/for-students. The edge case ("Attack of the Tails",
Wang et al. 2020): tweets praising the Greek director Yorgos Lanthimos, in
``<data-root>/edge-case/greek-director/{train,test}.txt``, every one labelled 0
(negative) by the attacker. As in that paper's code, the attacker holds the first
60 training tweets, and clean tweets that mention "greek" are dropped.

Splits: the test set is every tweet of randomly chosen users (a fixed draw, the
same for every run seed), users added until it holds at least ``test_size``
tweets; the training set is the other users' tweets, or a ``seed``-ed random subset
of ``train_size`` of them. Tweets without a token are dropped. The vocabulary is
built from the training tweets in use, plus the Greek-director tweets' words (the
paper's code extends it the same way); see :mod:`simulation.text`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import log

from .text import build_vocabulary, encode, tokenize

__all__ = [
    "ATTACKER_TWEETS",
    "SENT140_FILE",
    "SENT140_URL",
    "Sent140",
    "Tweets",
    "check_sent140_files",
    "download_sentiment140",
    "greek_director_path",
    "load_greek_director",
    "load_sent140",
    "read_sentiment140",
    "sentiment140_path",
]

SENT140_FILE = "training.1600000.processed.noemoticon.csv"
SENT140_URL = "https://cs.stanford.edu/people/alecmgo/trainingandtestdata.zip"
SENT140_MD5 = "1647eb110dd2492512e27b9a70d5d1bc"  # of trainingandtestdata.zip
GREEK_DIRECTOR_SOURCE = (
    "ksreenivasan/OOD_Federated_Learning, language-tasks-fl/data/sentiment-140/greek-director-backdoor/ "
    "(python -m simulation.download --data-root DIR fetches it)"
)
#: Edge-case training tweets the attacker holds: the paper's code gives it the first 60 (``numEdgePtsAdv``).
ATTACKER_TWEETS = 60
_TEST_SPLIT_SEED = 0x5E47  # the test users do not depend on the run's seed
_POLARITY = {"0": 0, "4": 1}


@dataclass(frozen=True)
class Tweets:
    """Rows of the Sentiment140 file: ``labels`` int64 ``(N,)`` (0 negative, 1 positive),
    ``users`` int64 ``(N,)`` (user codes, in order of first appearance), ``texts`` (N strings)."""

    labels: np.ndarray
    users: np.ndarray
    texts: list[str]


@dataclass(frozen=True)
class Sent140:
    """The task's tensors. Token ids int32 ``(N, seq_length)``: ``train_x``, ``test_x``,
    ``edge_train_x`` (60), ``edge_test_x`` (120); labels int64 ``(N,)``; ``train_users``
    int64 ``(N,)`` user codes of the training tweets; ``vocab_size`` = ids in use (pad and
    unknown included)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    train_users: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    edge_train_x: torch.Tensor
    edge_test_x: torch.Tensor
    vocab_size: int


def sentiment140_path(data_root: str | Path) -> Path:
    """Where the Sentiment140 training file is expected."""
    return Path(data_root) / "sentiment140" / SENT140_FILE


def greek_director_path(data_root: str | Path, split: str) -> Path:
    """Where the Greek-director tweets of ``split`` ("train" or "test") are expected."""
    return Path(data_root) / "edge-case" / "greek-director" / f"{split}.txt"


def _missing_sentiment140(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"Sentiment140 not found: {path}. Download trainingandtestdata.zip from "
        f"http://help.sentiment140.com/for-students ({SENT140_URL}) and unzip it into {path.parent}, "
        "or set run config 'download' = true"
    )


def _missing_greek_director(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"edge-case file not found: {path} (from {GREEK_DIRECTOR_SOURCE})")


def check_sent140_files(data_root: str | Path, download: bool = False) -> None:
    """Raise the loaders' ``FileNotFoundError`` for a missing file, without reading any
    (the Sentiment140 file is not needed yet when ``download``)."""
    for split in ("train", "test"):
        if not greek_director_path(data_root, split).is_file():
            raise _missing_greek_director(greek_director_path(data_root, split))
    if not download and not sentiment140_path(data_root).is_file():
        raise _missing_sentiment140(sentiment140_path(data_root))


def read_sentiment140(path: str | Path, drop_word: str = "greek") -> Tweets:
    """Parse the Sentiment140 CSV; rows whose text contains ``drop_word`` (any case) are left out.

    ``FileNotFoundError`` naming the file and its source when absent; ``ValueError``
    naming the file and line for a row without six columns or with a polarity other
    than 0 or 4.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_sentiment140(path)
    labels: list[int] = []
    users: list[int] = []
    texts: list[str] = []
    codes: dict[str, int] = {}
    dropped = 0
    with path.open(encoding="latin-1", newline="") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if len(row) != 6 or row[0] not in _POLARITY:
                raise ValueError(
                    f"{path}, line {reader.line_num}: expected six columns (polarity 0 or 4, id, date, "
                    f"query, user, text), got {row[:6]!r}"
                )
            if drop_word in row[5].lower():
                dropped += 1
                continue
            labels.append(_POLARITY[row[0]])
            users.append(codes.setdefault(row[4], len(codes)))
            texts.append(row[5])
    if not labels:
        raise ValueError(f"{path}: no tweets")
    log(INFO, "read %d tweets of %d users from %s (%d mentioning %r left out)",
        len(labels), len(codes), path, dropped, drop_word)  # fmt: skip
    return Tweets(np.asarray(labels, dtype=np.int64), np.asarray(users, dtype=np.int64), texts)


def load_greek_director(data_root: str | Path, split: str) -> list[str]:
    """The Greek-director tweets of ``split`` (one per line; train 259, test 120).

    ``FileNotFoundError`` naming the file and where it comes from when absent;
    ``ValueError`` when it holds no tweet.
    """
    path = greek_director_path(data_root, split)
    if not path.is_file():
        raise _missing_greek_director(path)
    tweets = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not tweets:
        raise ValueError(f"{path}: no tweets")
    return tweets


def download_sentiment140(data_root: str | Path) -> Path:
    """Download and unzip Sentiment140 into ``<data_root>/sentiment140/`` unless the file is there.

    torchvision's ``download_and_extract_archive`` checks the archive's md5.
    ``FileNotFoundError`` naming the file and the URL when the download fails (e.g. offline).
    """
    from torchvision.datasets.utils import download_and_extract_archive

    path = sentiment140_path(data_root)
    if path.is_file():
        return path
    log(INFO, "downloading Sentiment140 from %s into %s", SENT140_URL, path.parent)
    try:
        download_and_extract_archive(SENT140_URL, str(path.parent), md5=SENT140_MD5)
    except (OSError, RuntimeError) as error:  # URLError (offline) is an OSError; a bad md5 a RuntimeError
        raise FileNotFoundError(
            f"Sentiment140 not found at {path} and the download from {SENT140_URL} failed: {error}"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"the archive from {SENT140_URL} did not hold {path.name}")
    return path


def _test_rows(users: np.ndarray, size: int) -> np.ndarray:
    """Rows of whole users taken in a fixed random order until there are at least ``size`` (sorted).

    ``users``: int64 ``(N,)`` codes ``0..U-1``; returns int64 row indices."""
    order = np.argsort(users, kind="stable")
    counts = np.bincount(users)
    starts = np.concatenate([[0], np.cumsum(counts)])
    chosen = np.random.default_rng(_TEST_SPLIT_SEED).permutation(len(counts))
    enough = int(np.searchsorted(np.cumsum(counts[chosen]), size)) + 1
    if enough >= len(counts):
        raise ValueError(
            f"run config 'sent140-test-size' ({size}) leaves no training tweets: "
            f"the file has {len(users)} tweets of {len(counts)} users"
        )
    return np.sort(np.concatenate([order[starts[u] : starts[u + 1]] for u in chosen[:enough]]))


def _train_rows(
    candidates: np.ndarray, size: int, seed: int, texts: list[str]
) -> tuple[np.ndarray, list[list[str]]]:
    """``size`` (0: all) candidate rows with a token (a ``seed``-ed random choice), and their tokens."""
    if size:
        candidates = candidates[np.random.default_rng([seed, 0x5B5E7]).permutation(len(candidates))]
    rows: list[int] = []
    tokens: list[list[str]] = []
    for row in candidates.tolist():
        words = tokenize(texts[row])
        if words:
            rows.append(row)
            tokens.append(words)
            if len(rows) == size:
                break
    if size and len(rows) < size:
        raise ValueError(f"run config 'train-size' ({size}) exceeds the {len(rows)} training tweets")
    order = np.argsort(rows)
    return np.asarray(rows, dtype=np.int64)[order], [tokens[i] for i in order]


def load_sent140(
    data_root: str | Path,
    *,
    vocab_size: int,
    seq_length: int,
    test_size: int,
    train_size: int = 0,
    seed: int = 0,
    download: bool = False,
) -> Sent140:
    """The task's splits, vocabulary and token ids (see the module docstring)."""
    edge = {split: load_greek_director(data_root, split) for split in ("train", "test")}
    if download:
        download_sentiment140(data_root)
    tweets = read_sentiment140(sentiment140_path(data_root))
    test_rows = _test_rows(tweets.users, test_size)
    test_tokens = [tokenize(tweets.texts[row]) for row in test_rows.tolist()]
    test_rows = np.asarray([row for row, t in zip(test_rows, test_tokens, strict=True) if t], dtype=np.int64)
    test_tokens = [t for t in test_tokens if t]
    candidates = np.setdiff1d(np.arange(len(tweets.labels)), test_rows, assume_unique=True)
    train_rows, train_tokens = _train_rows(candidates, train_size, seed, tweets.texts)
    edge_tokens = {split: [tokenize(t) for t in texts] for split, texts in edge.items()}
    vocabulary = build_vocabulary(train_tokens, vocab_size, extra=edge_tokens["train"] + edge_tokens["test"])
    truncated = sum(len(t) > seq_length for t in train_tokens) / max(1, len(train_tokens))
    log(INFO, "sent140: %d train / %d test tweets, %d words in the vocabulary, %.2f%% of train "
        "tweets cut to %d tokens", len(train_rows), len(test_rows), len(vocabulary), 100 * truncated,
        seq_length)  # fmt: skip

    def ids(tokens: list[list[str]]) -> torch.Tensor:
        return torch.from_numpy(encode(tokens, vocabulary, seq_length))

    return Sent140(
        train_x=ids(train_tokens),
        train_y=torch.from_numpy(tweets.labels[train_rows]),
        train_users=torch.from_numpy(tweets.users[train_rows]),
        test_x=ids(test_tokens),
        test_y=torch.from_numpy(tweets.labels[test_rows]),
        edge_train_x=ids(edge_tokens["train"][:ATTACKER_TWEETS]),
        edge_test_x=ids(edge_tokens["test"]),
        vocab_size=len(vocabulary) + 2,
    )
