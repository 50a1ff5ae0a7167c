"""Tweets to token ids: a regex tokeniser, a frequency vocabulary, left-padded id arrays.

The tokeniser follows the cleaning of the "Attack of the Tails" text code (which
calls tweet-preprocessor's ``clean`` and NLTK's ``word_tokenize``) without
their packages: HTML entities are decoded, text is lower-cased, URLs, @mentions,
#hashtags and everything that is not an ASCII letter are dropped, and a token is a
run of letters with optional inner apostrophes (``don't`` stays one token). Unlike
that code, English stop words are kept: NLTK's list holds "not", "no" and "don't",
which carry sentiment, and NLTK is not a dependency here.

Ids: 0 pads, 1 stands for a word outside the vocabulary, 2.. are the vocabulary's
words by descending frequency. Sequences are left-padded (the words sit at the end,
as in the paper's code), so an LSTM's last output follows the last word.
"""

from __future__ import annotations

import html
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["PAD", "UNKNOWN", "build_vocabulary", "encode", "tokenize"]

PAD, UNKNOWN = 0, 1
_DROP = re.compile(r"https?://\S+|www\.\S+|[@#]\w+")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of one tweet (see the module docstring for the rules)."""
    return _WORD.findall(_DROP.sub(" ", html.unescape(text).lower()))


def build_vocabulary(
    token_lists: Iterable[Sequence[str]], size: int, extra: Iterable[Sequence[str]] = ()
) -> dict[str, int]:
    """Word -> id: the ``size`` most frequent tokens (ids 2..; ties by first appearance),
    then every token of ``extra`` not among them, in order of first appearance.

    ``extra`` is how the paper's code adds the edge-case tweets' words to the
    vocabulary of the clean training tweets.
    """
    counts = Counter(token for tokens in token_lists for token in tokens)
    vocabulary = {word: index for index, (word, _) in enumerate(counts.most_common(size), start=2)}
    for tokens in extra:
        for token in tokens:
            vocabulary.setdefault(token, len(vocabulary) + 2)
    return vocabulary


def encode(token_lists: Sequence[Sequence[str]], vocabulary: dict[str, int], seq_length: int) -> np.ndarray:
    """int32 ids ``(N, seq_length)``: the first ``seq_length`` tokens, left-padded with :data:`PAD`;
    words outside ``vocabulary`` become :data:`UNKNOWN`."""
    out = np.zeros((len(token_lists), seq_length), dtype=np.int32)
    for row, tokens in enumerate(token_lists):
        ids = [vocabulary.get(token, UNKNOWN) for token in tokens[:seq_length]]
        if ids:
            out[row, seq_length - len(ids) :] = ids
    return out
