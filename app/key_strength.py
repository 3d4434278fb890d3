"""How guessable a secret is: the parts of it a guesser tries first, found as zxcvbn's matchers find them.

zxcvbn (Dropbox) splits a password into matches of sequences (abc, 987), keyboard runs (qwerty), repeats and
dictionary words, and counts what is left as random. We do the same with small built-in tables: the characters that
fall into a pattern earn only a few bits for the whole pattern, the rest earn their Shannon entropy.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

MIN_RUN = 3  # three characters in a row of a sequence, a keyboard row or a repeat make a pattern
PATTERN_BITS = 8.0  # what one found pattern is worth to a guesser: its start, direction and length, roughly

# Keyboard rows, each also read backwards: US QWERTY and Russian ЙЦУКЕН.
KEYBOARD_ROWS = (
    "`1234567890-=",
    "qwertyuiop[]\\",
    "asdfghjkl;'",
    "zxcvbnm,./",
    "ёйцукенгшщзхъ",
    "фывапролджэ",
    "ячсмитьбю",
)

# Words that lead every password list (and this service's own names); four letters or more, lower case.
_WORD_LIST = """
    password passwd passw0rd secret secrets admin administrator root qwerty letmein welcome login master monkey
    dragon shadow sunshine princess football baseball soccer hockey batman superman trustno1 iloveyou love
    hello hunter killer freedom whatever starwars computer internet server service default changeme change
    token session cookie signing django flask fastapi retro retrotest test testing example sample demo
    production staging develop development local localhost company partner model models mlflow kubernetes
    docker celery redis postgres database access private public random string value correct horse battery
    staple abcd asdf zxcv qazwsx summer winter spring autumn monday friday january december michael jennifer
    jordan thomas robert charlie daniel andrew joshua matthew anthony ashley jessica amanda michelle pepper
    cheese coffee chocolate orange banana apple purple yellow silver golden diamond flower butterfly tiger
    lion eagle falcon phoenix ninja pirate wizard magic matrix zeros ones please thanks sorry nothing
    something anything everything always never forever moscow russia london paris berlin telecom mobile
    phone office manager support system network backup security secure safety
"""
WORDS = frozenset(_WORD_LIST.split())


# A guesser reads these as the letters they look like: p@ssw0rd is password.
_LEET = str.maketrans("0134578@$!|", "oieastbasil")


def guessable_bits(secret: str) -> float:
    """An estimate of the secret's entropy in bits, with sequences, keyboard runs, repeats and words discounted."""
    spans = _merged([*_runs(secret), *_repeats(secret), *_words(secret)])
    covered = {i for start, end in spans for i in range(start, end)}
    rest = [c for i, c in enumerate(secret) if i not in covered]
    return _shannon_bits(rest) + PATTERN_BITS * len(spans)


def _shannon_bits(chars: list[str]) -> float:
    """The length times the Shannon entropy of the characters: an upper estimate for random-looking text."""
    if not chars:
        return 0.0
    counts = Counter(chars)
    per_char = -sum(n / len(chars) * math.log2(n / len(chars)) for n in counts.values())
    return per_char * len(chars)


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching spans joined: one pattern each."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _steps(a: str, b: str) -> set[tuple[int, int]]:
    """The ways b follows a: one code point on (kind 0) or one key on along a keyboard row (kind 1 + row)."""
    ways = set()
    if a.isalnum() and b.isalnum() and abs(ord(b) - ord(a)) == 1:
        ways.add((0, ord(b) - ord(a)))
    for row_number, row in enumerate(KEYBOARD_ROWS, start=1):
        if a in row and b in row and abs(row.index(b) - row.index(a)) == 1:
            ways.add((row_number, row.index(b) - row.index(a)))
    return ways


def _runs(secret: str) -> list[tuple[int, int]]:
    """Runs of MIN_RUN or more characters each one step on from the last the same way: abc, 987, qwe, йцу."""
    lowered = secret.lower()
    steps = [_steps(a, b) for a, b in itertools.pairwise(lowered)]
    spans, i = [], 0
    while i < len(steps):
        way, j = steps[i], i
        while j + 1 < len(steps) and way & steps[j + 1]:
            way, j = way & steps[j + 1], j + 1
        if way and j - i + 2 >= MIN_RUN:
            spans.append((i, j + 2))
        i = j + 1
    return spans


def _repeats(secret: str) -> list[tuple[int, int]]:
    """Stretches that repeat something earlier in the secret (abcabc, xxxx), MIN_RUN characters at a time."""
    return [
        (i, i + MIN_RUN)
        for i in range(1, len(secret) - MIN_RUN + 1)
        if secret.find(secret[i : i + MIN_RUN], 0, i + MIN_RUN - 1) != -1
    ]


def _words(secret: str) -> list[tuple[int, int]]:
    """Where a listed word occurs, in any case and in leet spelling."""
    spans = []
    for text in {secret.lower(), secret.lower().translate(_LEET)}:
        for word in WORDS:
            start = text.find(word)
            while start != -1:
                spans.append((start, start + len(word)))
                start = text.find(word, start + 1)
    return spans
