"""Statistics over seeds: per-variant intervals, pairwise Welch tests, Holm's correction.

The rules, stated once so the table, the findings and the figures say the same thing:
- a variant's interval is the 95% Student-t confidence interval of its mean over seeds
  (mean ± t(0.975, n−1) · s/√n, s the sample standard deviation with n − 1);
- a pair's interval is the 95% Welch interval of the difference of means, its test Welch's
  t-test (unequal variances, Welch–Satterthwaite degrees of freedom), two-sided;
- across the pairs of one comparison, p-values are adjusted with Holm's step-down method;
- a difference is called real only when its Holm-adjusted p < 0.05 and both variants have
  at least MIN_SEEDS seeds. Its unadjusted 95% interval then excludes zero too (adjusted
  p ≥ raw p); the converse does not hold, so an interval that excludes zero is not enough.
- one seed has no spread: no standard deviation, interval or test (None, never NaN).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
MIN_SEEDS = 5  # below this per variant, no verdict: t intervals at n = 2-4 are too wide to trust or use
INTERVAL = "95% Student-t confidence interval of the mean"
PAIR_METHOD = ("the difference of means with its 95% Welch interval, Welch's t with Welch–Satterthwaite "
               "degrees of freedom, the two-sided p-value, and p adjusted with Holm's method across")


@dataclass(frozen=True)
class Summary:
    """A sample of per-seed values: n, mean, and (n ≥ 2) std with ddof=1 and the t interval."""

    n: int
    mean: float
    std: float | None
    ci: tuple[float, float] | None


def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample std and 95% Student-t interval of the mean; std and ci None for one value."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to summarize")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(1, mean, None, None)
    std = float(x.std(ddof=1))
    half = stats.t.ppf(1 - ALPHA / 2, x.size - 1) * std / math.sqrt(x.size)
    return Summary(int(x.size), mean, std, (mean - half, mean + half))


@dataclass(frozen=True)
class Difference:
    """Variant a minus variant b. Test fields are None when there is no test (see `reason`)."""

    a: str
    b: str
    n_a: int
    n_b: int
    difference: float  # mean(a) - mean(b)
    ci: tuple[float, float] | None = None  # 95% Welch interval, not adjusted
    t: float | None = None
    df: float | None = None
    p: float | None = None
    p_holm: float | None = None  # set by compare_pairs, across the pairs tested together
    reason: str | None = None  # why there is no test

    @property
    def enough_seeds(self) -> bool:
        return min(self.n_a, self.n_b) >= MIN_SEEDS

    @property
    def real(self) -> bool:
        """The rule: Holm-adjusted p < 0.05 with at least MIN_SEEDS seeds on both sides."""
        return self.enough_seeds and self.p_holm is not None and self.p_holm < ALPHA

    def verdict(self) -> str:
        """One plain sentence: no test and why, n too small, real (which is higher), or not shown."""
        if self.p is None:
            return self.reason
        if not self.enough_seeds:
            return (f"n is too small for a verdict ({self.n_a} and {self.n_b} seeds; "
                    f"at least {MIN_SEEDS} per variant are needed)")
        if self.p_holm is None:
            raise ValueError("verdict before Holm's correction: use compare_pairs")
        if self.real:
            higher = self.a if self.difference > 0 else self.b
            return f"real: {higher} is higher (Holm-adjusted p < {ALPHA:.2f})"
        return f"not shown to differ (Holm-adjusted p ≥ {ALPHA:.2f})"


def welch(a: Sequence[float], b: Sequence[float], label_a: str = "a", label_b: str = "b") -> Difference:
    """Welch's t-test and 95% interval of mean(a) − mean(b) (scipy.stats.ttest_ind, equal_var=False).

    No test with one value on a side (no spread to compare against), nor when neither side
    varies (the standard error is zero: scipy would report an infinite t and p = 0).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size == 0 or y.size == 0:
        raise ValueError(f"no values for {label_a if x.size == 0 else label_b}")
    base = Difference(label_a, label_b, int(x.size), int(y.size), float(x.mean() - y.mean()))
    single = [label for label, v in ((label_a, x), (label_b, y)) if v.size == 1]
    if single:
        return replace(base, reason=f"{' and '.join(single)} {'has' if len(single) == 1 else 'have'} one seed: "
                                    f"no interval or test")
    # equal values, not a zero variance: the mean of n equal values can be off by one rounding
    # step, leaving a variance of 1e-30 that scipy would divide by (t ~ 1e15, p ~ 0)
    constant = [bool(np.ptp(v) == 0) for v in (x, y)]
    if all(constant):
        return replace(base, reason="every seed of both variants gave the same value: no spread, no test")
    with warnings.catch_warnings():
        if any(constant):
            # One side's seeds all gave the same value (BN stuck at one class on a tiny split): its
            # variance is 0, not lost to cancellation, so scipy's warning would be wrong.
            warnings.filterwarnings("ignore", "Precision loss occurred in moment calculation", RuntimeWarning)
        result = stats.ttest_ind(x, y, equal_var=False)
    low, high = result.confidence_interval(CONFIDENCE)
    return replace(base, ci=(float(low), float(high)), t=float(result.statistic), df=float(result.df),
                   p=float(result.pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    Sorted ascending, the i-th smallest (1-based) of m becomes max over j ≤ i of
    min(1, (m − j + 1) · p_(j)): it controls the family-wise error rate at any level, and
    rejecting where adjusted p < 0.05 is Holm's procedure at 0.05.
    """
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


def compare_pairs(samples: dict[str, Sequence[float]], pairs: Sequence[tuple[str, str]]) -> list[Difference]:
    """Welch for each (a, b) pair, then Holm's correction across the pairs that have a test."""
    differences = [welch(samples[a], samples[b], a, b) for a, b in pairs]
    tested = [i for i, d in enumerate(differences) if d.p is not None]
    for i, adjusted in zip(tested, holm([differences[i].p for i in tested])):
        differences[i] = replace(differences[i], p_holm=adjusted)
    return differences


def format_p(p: float) -> str:
    """'= 0.013', '= 0.41', '< 0.001' (after 'p '): enough digits to read against 0.05, also
    next to it ('= 0.0496', not '= 0.050' beside the verdict "real")."""
    if p < 0.001:
        return "< 0.001"
    digits, threshold = (3 if p < 0.1 else 2), round(ALPHA, 9)  # 0.05, not 1 - 0.95
    while round(p, digits) == threshold != p and digits < 6:
        digits += 1
    return f"= {p:.{digits}f}"
