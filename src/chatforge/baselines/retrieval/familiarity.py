"""How familiar a message looks to a selection model: the guard in front of retrieval.

A response selector always has a best pool answer, and the learned ranker's score is not calibrated for text
unlike anything it was trained on: keyboard mash ("asdf qwer zxcv") or an English question put to the Korean
ChatbotData bot comes back as a confident pool answer. The guard asks a different question first: *does this
message look like the messages the model was trained to answer?*

:class:`CharBigramModel` answers it with a character bigram language model of the selector's training
questions, interpolated with a smoothed unigram model (Jelinek-Mercer), and scores a message by its mean
log-probability per character, start and end of text included (the *familiarity*, in (-inf, 0); higher is more
familiar). Characters are the natural unit for Korean (a syllable block is a character), need no tokenizer, and
an unseen character costs a bounded ``log((1 - weight) * 0.5 / (N + 0.5 * UNSEEN_CHARACTERS))`` rather than -inf.
On ChatbotData the training questions' model puts validation and test questions around -3.3 (1 % below -5.6),
English utterances, keyboard mash and random Hangul syllables around -11 (``benchmarks/familiarity_guard.py``).
The model is rebuilt from the bundle's training questions when first asked (counting 10,000 questions takes well
under a second), so every selection bundle has one without a format change, and it is deterministic.

The reply policy's ``min_familiarity`` (``chatforge.serving.policy``) sends a message below it to the fallback
reply as out of scope; ``chatforge replies --hybrid`` chooses it as a low quantile of the validation questions'
familiarity.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Iterable

BOS, EOS = "\x02", "\x03"  # start/end of text: a message's first and last characters are scored in context
UNSEEN_CHARACTERS = 12_000  # the unigram model's add-1/2 share for characters never seen: ~Hangul syllables + ASCII
DEFAULT_WEIGHT = 0.7  # the bigram model's share in the interpolation


class CharBigramModel:
    """A character bigram model of ``texts`` with unigram interpolation; :meth:`score` is the familiarity."""

    def __init__(self, texts: Iterable[str], weight: float = DEFAULT_WEIGHT) -> None:
        if not 0.0 <= weight < 1.0:
            raise ValueError(f"weight={weight!r} is out of range; allowed: [0, 1) (the bigram model's share)")
        self.weight = weight
        unigrams: Counter[str] = Counter()
        bigrams: Counter[str] = Counter()
        n_texts = 0
        for text in texts:
            s = BOS + unicodedata.normalize("NFC", text) + EOS
            unigrams.update(s[1:])
            bigrams.update(s[i:i + 2] for i in range(len(s) - 1))
            n_texts += 1
        if not n_texts:
            raise ValueError("a familiarity model needs at least one training text")
        total = sum(unigrams.values())
        context: Counter[str] = Counter()
        for pair, n in bigrams.items():
            context[pair[0]] += n
        # probabilities precomputed per seen unigram and bigram: scoring is one or two dict lookups per character
        denom = total + 0.5 * UNSEEN_CHARACTERS
        self._unseen = (1.0 - weight) * 0.5 / denom
        self._unigram = {c: (1.0 - weight) * (n + 0.5) / denom for c, n in unigrams.items()}
        self._bigram = {pair: weight * n / context[pair[0]] for pair, n in bigrams.items()}
        self.n_texts = n_texts

    def score(self, text: str) -> float:
        """Mean log-probability per character of ``text`` (end of text included): the familiarity, < 0. In Unicode
        NFC, as the selectors read text: decomposed Hangul (NFD) is the same message."""
        s = BOS + unicodedata.normalize("NFC", text) + EOS
        uni, bi, unseen = self._unigram, self._bigram, self._unseen
        total = 0.0
        for i in range(1, len(s)):
            total += math.log(bi.get(s[i - 1:i + 1], 0.0) + uni.get(s[i], unseen))
        return total / (len(s) - 1)
