"""Invented words: pronounceable names that no pretrained model can know.

A name is 2–3 syllables (onset + vowel + optional coda) plus a suffix that marks its kind
(`-itis` for a disease, `-mab` for a drug, ...), the way real names carry their class. One
`NameForge` hands out every name of a world, so no two entities share a spelling.
"""

from __future__ import annotations

import random

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "tr", "sh", "th"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou"]
CODAS = ["", "", "", "n", "r", "l", "s", "x", "m"]

# kind -> suffixes; a name of that kind ends in one of them
SUFFIXES: dict[str, list[str]] = {
    "country": ["ia", "land", "ora", "ovia", "esh", "aria"],
    "city": ["grad", "ville", "port", "heim", "burg", "ton"],
    "person": [""],
    "org": [" Bank", " Trust", " Mills", " Foundry", " Works"],
    "disease": ["itis", "osis", "emia", "algia"],
    "drug": ["mab", "vir", "cillin", "zole", "pril", "statin"],
    "company": [" Corp", " Labs", " Group", " Holdings", " Systems"],
}


def derive_rng(seed: int, part: str) -> random.Random:
    """An RNG for one part of the world; parts are independent, so adding one changes no other.

    `random.Random(str)` hashes the string with SHA-512, so this is stable across runs and platforms.
    """
    return random.Random(f"safemerge-testbed:{seed}:{part}")


class NameForge:
    """Hands out unique invented names (and tickers) from one seeded RNG."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self._used: set[str] = set()

    def _stem(self, n_syllables: int) -> str:
        r = self._rng
        return "".join(r.choice(ONSETS) + r.choice(VOWELS) + r.choice(CODAS) for _ in range(n_syllables))

    def name(self, kind: str) -> str:
        """A fresh capitalised name of `kind` (a key of SUFFIXES)."""
        for _ in range(10_000):
            stem = self._stem(self._rng.choice([2, 2, 3] if kind != "person" else [2]))
            word = stem.capitalize() + self._rng.choice(SUFFIXES[kind])
            if word.lower() not in self._used:
                self._used.add(word.lower())
                return word
        raise RuntimeError(f"NameForge: ran out of unique {kind} names")  # pragma: no cover

    def names(self, kind: str, n: int) -> list[str]:
        return [self.name(kind) for _ in range(n)]

    def ticker(self) -> str:
        """A fresh 3–4 letter stock ticker, unrelated to any company name (so it cannot be guessed)."""
        letters = "ABCDEFGHJKLMNPRSTVWXZ"
        for _ in range(10_000):
            t = "".join(self._rng.choice(letters) for _ in range(self._rng.choice([3, 4])))
            if t.lower() not in self._used:
                self._used.add(t.lower())
                return t
        raise RuntimeError("NameForge: ran out of unique tickers")  # pragma: no cover
