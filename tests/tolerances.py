"""How closely two correct computations of the bias-variance ratios agree, on any CPU.

The ratio is ``bias / (sum v_hat - bias)``: when it is large the denominator is a
difference of nearly equal sums, so float32 rounding in the EMAs (which kernels ran,
FMA or not, summation order, thread count) is amplified by ``1 + BVR``. Two correct
implementations therefore agree to about ``c * eps32 * (1 + BVR)``; ``RATIO_RTOL``
(~1000 float32 ulps) leaves room for the few thousand elements of the test models
while a wrong formula is off by far more.

At a tensor's first step the variance is 0 by definition (``v_hat = m_hat^2``) and
clamped to ``eps``; a naive ``v_hat - m_hat^2`` gives rounding noise there instead, so
step-1 ratios are never compared with the naive reference: step 1 selects the
largest bias (``largest_bias``).
"""

from __future__ import annotations

import math

RATIO_RTOL = 1e-4


def ratio_tolerance(ratio: float) -> float:
    """Absolute tolerance for a ratio computed by two different correct code paths."""
    return RATIO_RTOL * (1.0 + abs(ratio)) * abs(ratio)


def assert_ratios_match(ours, reference, what=""):
    """Every ratio within ``ratio_tolerance`` of the reference; NaN (no gradient) on both sides alike."""
    assert len(ours) == len(reference), what
    for g, (o, r) in enumerate(zip(ours, reference)):
        if math.isnan(r):
            assert math.isnan(o), (what, g, o, r)
            continue
        assert abs(o - r) <= ratio_tolerance(r), (what, g, o, r)


def clear_top_k(ratios, k=1, margin=2.0):
    """The top-k indices (sorted) when the k-th largest ratio is separated from the next one by more
    than ``margin`` times both their tolerances; None when the choice is within rounding noise."""
    order = sorted((i for i, r in enumerate(ratios) if not math.isnan(r)), key=lambda i: -ratios[i])
    if len(order) <= k:
        return sorted(order)
    last_in, first_out = ratios[order[k - 1]], ratios[order[k]]
    if last_in - first_out <= margin * (ratio_tolerance(last_in) + ratio_tolerance(first_out)):
        return None
    return sorted(order[:k])


def largest_bias(group_grads, k=1):
    """Step-1 selection: every variance is 0 (clamped), so the groups with the largest ``sum ||g||^2``
    win. ``group_grads``: per group, the gradients (tensors) it has. None if within rounding noise."""
    sums = [sum(float(g.double().square().sum()) for g in grads) if grads else math.nan for grads in group_grads]
    order = sorted((i for i, s in enumerate(sums) if not math.isnan(s)), key=lambda i: -sums[i])
    if len(order) > k and sums[order[k - 1]] <= sums[order[k]] * (1 + 1e-5):
        return None
    return sorted(order[:k])


def assert_selected_on_the_stepped_gradients(steps):
    """``steps``: per step ``selected``, ``ratios``, ``naive`` (reference ratios) and ``grads`` (per group).

    The selector saw the gradients the framework stepped with: step 1 picks the largest bias (every
    variance is 0), later steps match the naive reference's ratios and its top group wherever that top
    is clear of rounding noise (and it is on most steps, or the test would prove nothing)."""
    first = largest_bias(steps[0]["grads"])
    assert first is None or steps[0]["selected"] == first, "step 1"
    compared = first is not None
    for t, step in enumerate(steps[1:], start=2):
        assert_ratios_match(step["ratios"], step["naive"], f"step {t}")
        expected = clear_top_k(step["naive"])
        if expected is not None:
            assert step["selected"] == expected, f"step {t}"
            compared += 1
    assert compared >= len(steps) // 2, f"only {compared} of {len(steps)} steps had a clear top group"
