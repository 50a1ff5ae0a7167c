"""Write a synthetic file in the exact Sentiment140 format, for tests and cost measurements.

Sentiment140 (Go, Bhayani, Huang 2009) is not on this project's machines. This writes
``<out>/sentiment140/training.1600000.processed.noemoticon.csv`` the way the real file
is written: latin-1, six double-quoted columns (polarity 0 or 4, id, date, query,
user, text), negatives first, then positives. The tweets are random words: a
sentiment word list per polarity mixed with neutral filler and, with ``rare_words``, a
long tail of made-up words (so that a cost measurement fills a real-sized vocabulary),
plus what real tweets carry (@mentions, URLs, HTML entities such as ``&quot;``, commas,
embedded quotes, latin-1 letters). Users tweet a heavy-tailed number of times. No result measured on
this file says anything about accuracy on Sentiment140; it sizes the work.

    python -m benchmarks.sent140_synthetic --out /tmp/s140 --tweets 1600000 --users 660000 \
        --rare-words 200000 --edge-case /work/shared/data/edge-case

``--edge-case`` links ``<edge-case>/greek-director`` into ``<out>/edge-case/`` so that
``<out>`` is a complete data root for ``task = "sent140"``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

__all__ = ["NEGATIVE_WORDS", "POSITIVE_WORDS", "link_edge_case", "write_sentiment140_csv"]

POSITIVE_WORDS = ("love", "great", "happy", "awesome", "thanks", "good", "fun", "nice", "best", "excited")
NEGATIVE_WORDS = ("sad", "hate", "bad", "sick", "tired", "miss", "sorry", "awful", "worst", "broken")
FILLER_WORDS = (
    "the", "a", "i", "to", "is", "it", "my", "today", "work", "day", "going", "just", "now", "so",
    "with", "and", "you", "at", "home", "night", "morning", "school", "lol", "got", "new", "weekend",
)  # fmt: skip
_DAYS, _MONTHS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"), ("Apr", "May", "Jun")


def _rare_word(index: int) -> str:
    letters = ""
    while True:
        index, digit = divmod(index, 26)
        letters += chr(ord("a") + digit)
        if not index:
            return "zq" + letters


def _tweets(rng: np.random.Generator, positive: np.ndarray, rare_words: int) -> list[str]:
    """One random tweet per entry of the boolean array ``positive``; filler words are made-up
    ones (rank r of ``rare_words`` with probability ~ 1/r) a third of the time when ``rare_words``."""
    count = len(positive)
    lengths = rng.integers(3, 20, size=count)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    sentiment = rng.random(starts[-1]) < 0.3
    sentiment[starts[:-1] + (rng.random(count) * lengths).astype(int)] = True  # >= 1 sentiment word
    choice = rng.integers(0, 1 << 30, size=starts[-1])
    rare = rng.random(starts[-1]) < (1 / 3 if rare_words else 0)
    rare_rank = (max(rare_words, 1) ** rng.random(starts[-1])).astype(int) - 1  # P(rank r) ~ 1/r
    extras = rng.random(count)
    tweets = []
    for k in range(count):
        lexicon = POSITIVE_WORDS if positive[k] else NEGATIVE_WORDS
        span = slice(starts[k], starts[k + 1])
        words = []
        for s, c, t, r in zip(sentiment[span], choice[span], rare[span], rare_rank[span], strict=True):
            if s:
                words.append(lexicon[c % len(lexicon)])
            else:
                words.append(_rare_word(int(r)) if t else FILLER_WORDS[c % len(FILLER_WORDS)])
        extra = extras[k]
        if extra < 0.15:
            words.insert(0, f"@friend{int(extra * 1e6) % 1000}")
        elif extra < 0.25:
            words.append(f"http://twitpic.com/{int(extra * 1e9):x}")
        elif extra < 0.30:
            words.insert(1, "&quot;caf\u00e9&quot;,")
        elif extra < 0.33:
            words.append('"quoted"')
        tweets.append(" ".join(words))
    return tweets


def write_sentiment140_csv(
    out: str | Path, num_tweets: int, num_users: int, seed: int = 0, line_end: str = "\n", rare_words: int = 0
) -> Path:
    """Write ``<out>/sentiment140/training.1600000.processed.noemoticon.csv``; returns its path.

    ``num_tweets`` rows, half negative (polarity 0, first) and half positive (4),
    from ``num_users`` users whose tweet counts follow a Zipf-like law (each user
    tweets at least once if ``num_tweets >= num_users``); ``rare_words`` made-up words
    in the long tail (see :func:`_tweets`). Reproducible from ``seed``.
    """
    rng = np.random.default_rng(seed)
    path = Path(out) / "sentiment140" / "training.1600000.processed.noemoticon.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = 1.0 / np.arange(1, num_users + 1) ** 0.7
    users = rng.choice(num_users, size=num_tweets, p=weights / weights.sum())
    users[: min(num_users, num_tweets)] = rng.permutation(num_users)[: min(num_users, num_tweets)]
    users = rng.permutation(users)
    with path.open("w", encoding="latin-1", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL, lineterminator=line_end)
        for first in range(0, num_tweets, 100_000):
            rows = np.arange(first, min(num_tweets, first + 100_000))
            positive = rows >= num_tweets // 2
            tweets = _tweets(rng, positive, rare_words)
            for row, tweet, good in zip(rows.tolist(), tweets, positive.tolist(), strict=True):
                date = (
                    f"{_DAYS[row % 7]} {_MONTHS[row % 3]} {1 + row % 28:02d} "
                    f"{row % 24:02d}:{row % 60:02d}:{(7 * row) % 60:02d} PDT 2009"
                )
                user = f"user_{int(users[row])}"
                writer.writerow([4 if good else 0, 1467810369 + row, date, "NO_QUERY", user, tweet])
    return path


def link_edge_case(out: str | Path, edge_case_root: str | Path) -> Path:
    """Symlink ``<edge_case_root>/greek-director`` to ``<out>/edge-case/greek-director``; returns the link."""
    link = Path(out) / "edge-case" / "greek-director"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(Path(edge_case_root).resolve() / "greek-director", target_is_directory=True)
    return link


def main() -> None:
    """CLI: write the synthetic file (and link the Greek-director tweets)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="data root to write")
    parser.add_argument("--tweets", type=int, default=1_600_000)
    parser.add_argument("--users", type=int, default=660_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rare-words", type=int, default=200_000, help="made-up words in the long tail")
    parser.add_argument("--edge-case", help="a directory holding greek-director/{train,test}.txt")
    args = parser.parse_args()
    print(write_sentiment140_csv(args.out, args.tweets, args.users, args.seed, rare_words=args.rare_words))
    if args.edge_case:
        print(link_edge_case(args.out, args.edge_case))


if __name__ == "__main__":
    main()
