"""Statistics over k seeds: confidence intervals and the clean-accuracy comparison (§4.1, §5.1).

The paper reports each datapoint over several independently trained models (32 for attack success
rates, §4.2; 8 for z-scores, §5.1) and states that "none of the models we poison or backdoor have
statistically significantly lower zero-shot test accuracy" (§4.1). ``summarize`` gives the mean and
its interval over seeds; ``compare_accuracy`` is that one-sided test, poisoned vs clean.

Both return plain dicts with the same keys whatever the input size; where n is too small for a
quantity to exist it is NaN and ``note`` says why (rather than a crash or a made-up number).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st

SUMMARY_METHODS = ("t", "bootstrap")


def _values(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers (one per seed), "
                         f"got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds {int(np.sum(~np.isfinite(x)))} non-finite value(s) "
                         f"({x.tolist()}); drop the failed seeds before summarising")
    return x


def summarize(values, ci: float = 0.95, method: str = "t", seed: int = 0,
              n_resamples: int = 9999) -> dict:
    """Mean over seeds with sample std (ddof=1) and a two-sided ``ci`` confidence interval.

    ``method="t"``: Student-t interval, mean ± t_{(1+ci)/2, n-1} · std/√n.
    ``method="bootstrap"``: percentile bootstrap of the mean (scipy.stats.bootstrap, seeded).
    Returns ``{"mean", "std", "n", "ci", "method", "ci_low", "ci_high", "note"}``; with n = 1 the
    std and interval are NaN and ``note`` says so.
    """
    if method not in SUMMARY_METHODS:
        raise ValueError(f"method={method!r} is not one of {SUMMARY_METHODS}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci={ci} must be a confidence level strictly between 0 and 1, e.g. 0.95")
    x = _values(values, "values")
    n = int(x.size)
    mean = float(x.mean())
    out = {"mean": mean, "std": float("nan"), "n": n, "ci": float(ci), "method": method,
           "ci_low": float("nan"), "ci_high": float("nan"), "note": None}
    if n < 2:
        out["note"] = "n=1: std and confidence interval are undefined (need at least 2 seeds)"
        return out
    std = float(x.std(ddof=1))
    out["std"] = std
    if std == 0.0:
        # Every seed agrees: both interval methods collapse to the point (scipy would return NaN).
        out.update(ci_low=mean, ci_high=mean, note="all values identical: zero-width interval")
        return out
    if method == "t":
        lo, hi = _st.t.interval(ci, df=n - 1, loc=mean, scale=std / math.sqrt(n))
    else:
        # Percentile, not BCa: BCa's acceleration is undefined for the near-degenerate resamples
        # that a handful of seeds (e.g. success rates all 0 or 1 but one) routinely produce.
        res = _st.bootstrap((x,), np.mean, confidence_level=ci, n_resamples=n_resamples,
                            method="percentile", rng=np.random.default_rng(seed))
        lo, hi = res.confidence_interval.low, res.confidence_interval.high
    out.update(ci_low=float(lo), ci_high=float(hi))
    return out


def compare_accuracy(poisoned_values, clean_values, alpha: float = 0.05) -> dict:
    """§4.1: is the poisoned models' clean (zero-shot) accuracy significantly lower than the clean
    models'? Welch's t-test (unequal variances), one-sided, H1: mean(poisoned) < mean(clean).

    Returns ``{"mean_difference" (poisoned − clean), "t", "df", "p_value" (one-sided),
    "p_value_two_sided", "alpha", "significantly_lower", "n_poisoned", "n_clean", "note"}``.
    With fewer than 2 values in a group the test is undefined: t and p are NaN,
    ``significantly_lower`` is False and ``note`` says so.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must lie strictly between 0 and 1, e.g. 0.05")
    p = _values(poisoned_values, "poisoned_values")
    c = _values(clean_values, "clean_values")
    nan = float("nan")
    out = {"mean_difference": float(p.mean() - c.mean()), "t": nan, "df": nan, "p_value": nan,
           "p_value_two_sided": nan, "alpha": float(alpha), "significantly_lower": False,
           "n_poisoned": int(p.size), "n_clean": int(c.size), "note": None}
    if p.size < 2 or c.size < 2:
        out["note"] = (f"Welch's t-test needs at least 2 values per group (got n_poisoned={p.size}, "
                       f"n_clean={c.size}); no test was run")
        return out
    if p.var(ddof=1) == 0.0 and c.var(ddof=1) == 0.0:
        # A zero standard error makes t = ±inf or 0/0; a t-test says nothing here, so don't claim one.
        out["note"] = "both groups have zero variance: the t statistic is undefined; no test was run"
        return out
    one = _st.ttest_ind(p, c, equal_var=False, alternative="less")
    two = _st.ttest_ind(p, c, equal_var=False, alternative="two-sided")
    out.update(t=float(one.statistic), df=float(one.df), p_value=float(one.pvalue),
               p_value_two_sided=float(two.pvalue), significantly_lower=bool(one.pvalue < alpha))
    return out


def compare_accuracy_paired(poisoned_values, clean_values, ci: float = 0.95, alpha: float = 0.05) -> dict:
    """§4.1 for victims that share seeds (same init, same clean data order): element i of both lists
    is seed i. The per-seed differences d = poisoned − clean carry the comparison, so the test is a
    one-sided paired t-test (H1: mean d < 0) with a Student-t interval of mean d — not Welch, which
    would throw the pairing away and count seed-to-seed spread as noise.

    Returns ``{"mean_difference", "std_difference", "ci_low", "ci_high", "ci", "t", "df", "p_value"
    (one-sided), "p_value_two_sided", "alpha", "significantly_lower", "n_pairs", "note"}``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must lie strictly between 0 and 1, e.g. 0.05")
    p = _values(poisoned_values, "poisoned_values")
    c = _values(clean_values, "clean_values")
    if p.size != c.size:
        raise ValueError(f"paired values need one clean value per poisoned value (got {p.size} and {c.size})")
    d = p - c
    s = summarize(d, ci=ci)
    nan = float("nan")
    out = {"mean_difference": s["mean"], "std_difference": s["std"], "ci_low": s["ci_low"], "ci_high": s["ci_high"],
           "ci": float(ci), "t": nan, "df": nan, "p_value": nan, "p_value_two_sided": nan, "alpha": float(alpha),
           "significantly_lower": False, "n_pairs": int(d.size), "note": s["note"]}
    if d.size < 2 or not s["std"] > 1e-12:  # float noise in equal differences is no spread either
        out["note"] = (f"a paired t-test needs at least 2 pairs with differences that vary (got {d.size} pair(s), "
                       f"differences {d.round(4).tolist()}); no test was run")
        return out
    t = s["mean"] / (s["std"] / math.sqrt(d.size))
    out.update(t=float(t), df=float(d.size - 1), p_value=float(_st.t.cdf(t, d.size - 1)),
               p_value_two_sided=float(2 * _st.t.sf(abs(t), d.size - 1)))
    out["significantly_lower"] = bool(out["p_value"] < alpha)
    return out
