"""The largest-batch search against memory curves with a known answer (no compiler)."""

import numpy as np

from pcjax.accelerators import batch_search


def test_largest_fitting_batch_agrees_with_a_linear_scan():
    rng = np.random.default_rng(0)
    for _ in range(50):
        base, slope = rng.uniform(0, 100), rng.uniform(0.1, 10)
        curve = rng.uniform(0, 0.02)  # memory a little convex in the batch
        capacity = rng.uniform(base, base + 5000)
        calls = []

        def need(b, base=base, slope=slope, curve=curve):
            return base + slope * b + curve * b * b

        def fits(b, need=need, capacity=capacity, calls=calls):
            calls.append(b)
            return need(b) <= capacity, need(b), None

        failed = int(rng.integers(2, 5000))
        if need(failed) <= capacity:
            continue
        expected = max([b for b in range(1, failed) if need(b) <= capacity], default=0)
        got = batch_search.largest_fitting_batch(fits, capacity, hi=failed, hi_bytes=need(failed))
        assert got <= expected <= got + batch_search.margin(got)  # within 1 %
        assert got == 0 or need(got) <= capacity
        assert len(calls) <= 2 * int(np.log2(failed)) + 3
        calls.clear()
        if expected > 1:  # from a batch that fits, upper end unknown
            start = int(rng.integers(1, expected + 1))
            got = batch_search.largest_fitting_batch(fits, capacity, start, need(start))
            assert got <= expected <= got + batch_search.margin(got)
            assert need(got) <= capacity
            assert len(calls) <= 3 * int(np.log2(expected)) + 4


def test_largest_fitting_batch_copes_with_memory_that_is_not_smooth():
    """Compiled memory jumps with tiles and fusion choices (up to 8 images' worth here, not
    monotone): lines are drawn between points far apart and the limit is bracketed to 1 %, so
    a search from the paper's batch takes a handful of compiles, not dozens."""
    rng = np.random.default_rng(1)
    for _ in range(100):
        base, slope = rng.uniform(0, 100), rng.uniform(0.1, 10)
        capacity = rng.uniform(base + 200 * slope, base + 20000 * slope)
        wobble = rng.uniform(0, 8) * slope
        noise = rng.uniform(0, 1, 1 << 17)

        def need(b, base=base, slope=slope, wobble=wobble, noise=noise):
            return base + slope * b + wobble * noise[b]

        calls = []

        def fits(b, need=need, capacity=capacity, calls=calls):
            calls.append(b)
            return need(b) <= capacity, need(b), None

        start = int(rng.integers(1, 64))
        got = batch_search.largest_fitting_batch(fits, capacity, start, need(start))
        assert need(got) <= capacity
        above = [b for b in calls if got < b <= got + batch_search.margin(got)]
        assert above and need(min(above)) > capacity  # the other end, compiled, does not fit
        assert len(calls) <= 9, calls


def test_largest_fitting_batch_takes_the_capacity_a_refusal_states():
    """A TPU compiler refuses with the bytes it has ("exceeds available HBM (15.75G)"), a little
    less than the datasheet's: once stated, aims use it, and the search needs fewer compiles
    than with the datasheet's figure alone."""
    rng = np.random.default_rng(2)
    told, untold = [], []
    for _ in range(100):
        base, slope = rng.uniform(0, 100), rng.uniform(0.1, 10)
        capacity = rng.uniform(base + 200 * slope, base + 20000 * slope)
        datasheet = capacity * rng.uniform(1.01, 1.05)
        start = int(rng.integers(1, 64))
        for calls, states in ((told, True), (untold, False)):
            tries = []

            def fits(b, tries=tries, states=states, base=base, slope=slope, capacity=capacity):
                tries.append(b)
                need = base + slope * b
                return need <= capacity, need, capacity if states and need > capacity else None

            got = batch_search.largest_fitting_batch(fits, datasheet, start, base + slope * start)
            expected = int((capacity - base) // slope)
            assert got <= expected <= got + batch_search.margin(got)
            calls.append(len(tries))
    assert all(a <= b for a, b in zip(told, untold, strict=True))
    assert sum(told) < sum(untold), (sum(told), sum(untold))
