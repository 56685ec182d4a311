"""Exact statistics for paired-by-seed comparisons (pure Python: no scipy in the pinned env).

Two configurations run at the same seeds give n paired differences d_i = a_i − b_i. Tests:

- paired t-test: t = mean(d) / (sd(d) / √n) with n − 1 degrees of freedom (exact df, no
  floor); two-sided p = I_{df/(df+t²)}(df/2, 1/2), the regularized incomplete beta function
  (Abramowitz & Stegun 26.7.1), evaluated by its continued fraction (Numerical Recipes §6.4).
- sign-flip permutation test: under H0 each d_i is as likely −d_i; p = share of the 2^n sign
  patterns whose |mean| is at least the observed |mean|. Exact, assumption-free, but its floor is
  2 / 2^n (0.25 for n = 3, 0.125 for n = 4): with few seeds it cannot reach 0.05 by design.
- minimum detectable effect: the smallest true mean difference δ the two-sided paired t-test at
  level α detects with the given power, for a difference spread ``sd`` and n pairs; the power of
  the non-central t, P(|T| > c) with T = (Z + λ) / √(V/df), λ = δ√n / sd, V ~ χ²(df), integrated
  over V numerically (Simpson's rule).
"""
from __future__ import annotations

import itertools
import math
import statistics
from typing import Optional


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converges for x < (a+1)/(a+b+2)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with ``df`` degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p_two_sided: float, df: float) -> float:
    """c with P(|T| ≥ c) = p (bisection; c grows as p falls)."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > p_two_sided:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > p_two_sided else (lo, mid)
    return (lo + hi) / 2.0


def paired_t(a: list[float], b: list[float]) -> Optional[dict]:
    """Paired t-test of a − b (same seeds, same order): mean, sd, n, t, df, two-sided p; None with
    fewer than 2 pairs. No spread at all: t is infinite (p 0) unless the mean is 0 (p 1)."""
    if len(a) != len(b) or len(a) < 2:
        return None
    d = [x - y for x, y in zip(a, b)]
    mean, sd, n = statistics.mean(d), statistics.stdev(d), len(d)
    if sd == 0:
        return {"diff": mean, "sd": 0.0, "n": n, "t": math.inf if mean else 0.0, "df": n - 1, "p": 0.0 if mean else 1.0}
    t = mean / (sd / math.sqrt(n))
    return {"diff": mean, "sd": sd, "n": n, "t": t, "df": n - 1, "p": t_two_sided_p(t, n - 1)}


def sign_flip_p(diffs: list[float]) -> Optional[float]:
    """Exact two-sided sign-flip permutation p-value of mean(diffs) over all 2^n sign patterns."""
    if not diffs:
        return None
    observed = abs(sum(diffs)) * (1 - 1e-12)  # a pattern equal to the observed one counts (float ties)
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed
               for signs in itertools.product((1, -1), repeat=len(diffs)))
    return hits / 2 ** len(diffs)


def _scaled_chi_pdf(s: float, df: float) -> float:
    """Density of s = √(V/df), V ~ χ²(df): 2 df s · χ²pdf(df s²) (its value at 0 included)."""
    k = df / 2.0
    log_rest = math.log(2 * df) + (k - 1) * math.log(df) - df * s * s / 2.0 - k * math.log(2.0) - math.lgamma(k)
    if s == 0:
        return math.exp(log_rest) if df == 1 else 0.0
    return math.exp(log_rest + (df - 1) * math.log(s))


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def t_power(ncp: float, df: float, alpha: float = 0.05, points: int = 2000) -> float:
    """Power of the two-sided t-test at level ``alpha``: P(|T| > c), T non-central t(df, ncp).
    Integrated over s = √(V/df) (dV = 2 df s ds), where the integrand is smooth at 0."""
    c = t_quantile(alpha, df)
    h = math.sqrt((df + 40.0 * math.sqrt(2.0 * df) + 60.0) / df) / points
    total = 0.0
    for i in range(points + 1):
        s = i * h
        w = 1 if i in (0, points) else (4 if i % 2 else 2)
        total += w * _scaled_chi_pdf(s, df) * (_phi(ncp - c * s) + _phi(-ncp - c * s))
    return total * h / 3.0


def min_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> Optional[float]:
    """Smallest mean paired difference the two-sided paired t-test detects with ``power``, for
    differences of standard deviation ``sd`` over ``n`` pairs; None with fewer than 2 pairs."""
    if n < 2 or not math.isfinite(sd):
        return None
    df, lo, hi = n - 1, 0.0, 1.0
    while t_power(hi, df, alpha) < power:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_power(mid, df, alpha) < power else (lo, mid)
    return hi * sd / math.sqrt(n)
