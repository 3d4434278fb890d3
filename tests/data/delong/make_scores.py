"""Writes scores.csv, the rows tests/test_compare.py checks DeLong's test on (run once; the CSV is committed)."""

from pathlib import Path

import numpy as np

rng = np.random.default_rng(20261206)
n = 3000
x = rng.normal(size=n)
y = (rng.random(n) < 1 / (1 + np.exp(-(1.2 * x - 1.5)))).astype(int)
a = 1 / (1 + np.exp(-(x + rng.normal(scale=1.0, size=n))))
b = np.round(1 / (1 + np.exp(-(0.8 * x + rng.normal(scale=1.2, size=n)))), 2)  # ties: two decimals
c = np.round(rng.random(n), 1)  # a score that knows nothing, heavily tied
d = 1 / (1 + np.exp(-(x + rng.normal(scale=1.1, size=n))))  # close to a: a p-value far from 0
with open(Path(__file__).with_name("scores.csv"), "w") as fh:
    fh.write("y,a,b,c,d\n")
    for row in zip(y, a, b, c, d, strict=True):
        fh.write(f"{int(row[0])},{float(row[1])!r},{float(row[2])!r},{float(row[3])!r},{float(row[4])!r}\n")
