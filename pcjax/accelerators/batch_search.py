"""The largest batch that fits, found with few compiles: each try is a compile of minutes, so
tries aim along lines through measured (batch, bytes) points instead of bisecting blindly."""

from __future__ import annotations

from collections.abc import Callable


def _aim(p: tuple, q: tuple, capacity: float | None) -> int | None:
    """The batch where the line through (batch, bytes) points p and q reaches `capacity`."""
    (b0, m0), (b1, m1) = p, q
    if capacity is None or m0 is None or m1 is None or b1 == b0 or (m1 - m0) / (b1 - b0) <= 0:
        return None
    return b0 + int((capacity - m0) * (b1 - b0) / (m1 - m0))


def margin(batch: int) -> int:
    """How close `largest_fitting_batch` brackets the limit: 1 % of the batch, at least 1."""
    return max(1, batch // 100)


def largest_fitting_batch(
    fits: Callable[[int], tuple[bool, float | None, float | None]],
    capacity: float | None,
    lo: int = 0,
    lo_bytes: float | None = None,
    hi: int | None = None,
    hi_bytes: float | None = None,
) -> int:
    """A per-device batch b with `fits(b)` and some b' <= b + `margin(b)` (1 % of b, at least
    one) with not `fits(b')`: the largest that fits to within 1 % where memory grows with the
    batch (0 if 1 does not fit), knowing that `lo` fits (0: nothing known) and `hi` does not
    (None: nothing known).

    `fits(b)` compiles at b: (fits, bytes it needs or None, bytes available or None). The
    available bytes a compiler states when it refuses a program replace `capacity` (a
    datasheet's figure) from then on. Memory grows about linearly with
    the batch but not smoothly (tiles, changed fusions), so lines are drawn between points far
    apart: while nothing is known not to fit, the try aims where the line from the first
    fitting point through the latest reaches `capacity`, and at least doubles; once bracketed,
    it aims along the line through the bracket's ends. A fitting aim is confirmed by trying
    `margin` more; two tries in a row that do not halve the bracket are followed by a
    bisection. Both ends are compiled.
    """
    if lo < 1:
        ok, lo_bytes, _ = fits(1)
        if not ok:
            return 0
        lo = 1
    first, step, slow = (lo, lo_bytes), "aim", 0
    while hi is None or hi - lo > margin(lo):
        if step == "confirm":
            guess = lo + margin(lo)
        elif hi is None:
            aim = _aim(first, (lo, lo_bytes), capacity) if lo > first[0] else None
            guess = max(aim or 0, 2 * lo)
        elif step == "bisect":
            guess = (lo + hi) // 2
        else:
            guess = _aim((lo, lo_bytes), (hi, hi_bytes), capacity) or (lo + hi) // 2
        guess = max(guess, lo + 1) if hi is None else min(max(guess, lo + 1), hi - 1)
        width = None if hi is None else hi - lo
        ok, used, available = fits(guess)
        capacity = available or capacity
        aimed = step == "aim" and guess > 2 * lo if hi is None else step == "aim"
        if ok:
            lo, lo_bytes = guess, used
        else:
            hi, hi_bytes = guess, used
        slow = slow + 1 if width is not None and (hi - lo) * 2 > width else 0
        step = "confirm" if ok and aimed else "bisect" if slow >= 2 else "aim"
        slow = 0 if step == "bisect" else slow
    return lo
