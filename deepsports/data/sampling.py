"""The original's five ways of picking ``k`` frames from a clip of ``n`` frames.

With ``step = n / k`` and ``offset`` the clip's first frame (the original's ``start_frame``):

- ``random``: a sorted sample of ``k`` distinct frames. The original's ``random.sample`` crashed when
  ``k > n``; here every frame is then taken ``k // n`` times plus a sorted distinct sample of
  ``k % n`` more, so the result is as spread as possible and still sorted (the spaced methods repeat
  frames in the same situation).
- ``spaced_fixed``: ``int(i * step + offset)`` for ``i = 0..k-1``; deterministic.
- ``spaced_varied``: one random shift ``r * step`` (``r`` uniform in [0, 1)) added to the offset of
  the whole clip.
- ``spaced_fixed_new``: in the original's code this is the same rule as ``spaced_varied`` (one shift
  for the whole clip, added after ``i * step + offset`` rather than to the offset); kept under its
  name so configs of the original keep their meaning.
- ``spaced_varied_new``: an independent shift ``r_i * step`` per sample.

Floats are evaluated in the original's order, so for the same draws the frames are identical. All
randomness comes from the ``np.random.Generator`` passed in (never the global ``random``), drawn in
the order above. Indices never leave ``offset .. offset + n - 1`` (a guard against a shift that rounds
up to ``step``).
"""

from __future__ import annotations

import numpy as np

from deepsports.config import FRAME_METHODS
from deepsports.errors import DataError


def sample_indices(method: str, num_frames_in_clip: int, k: int, offset: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` frame numbers (int64, sorted) out of ``offset .. offset + num_frames_in_clip - 1``.

    Use ``offset=start_frame`` for the original's absolute frame numbers, ``offset=0`` for indices into
    a cached clip.
    """
    n = int(num_frames_in_clip)
    if n < 1:
        raise DataError(f"cannot sample frames from a clip of {n} frames (start {offset})")
    if k < 1:
        raise DataError(f"frame_num must be >= 1 to sample a clip, got {k}")
    if method == "random":
        repeats, extra = divmod(k, n)
        picked = rng.choice(n, size=extra, replace=False) if extra else np.empty(0, dtype=np.int64)
        frames = np.sort(np.concatenate([np.repeat(np.arange(n), repeats), picked]))
        return frames.astype(np.int64) + offset
    step = n / k
    i = np.arange(k, dtype=np.float64)
    if method == "spaced_fixed":
        positions = i * step + offset
    elif method == "spaced_varied":
        positions = i * step + (offset + rng.random() * step)
    elif method == "spaced_fixed_new":
        positions = i * step + offset + rng.random() * step
    elif method == "spaced_varied_new":
        positions = i * step + offset + rng.random(k) * step
    else:
        raise DataError(f"frame_method={method!r} is unknown: expected one of {', '.join(FRAME_METHODS)}")
    # int() of a non-negative float truncates, as astype does.
    return np.minimum(positions.astype(np.int64), offset + n - 1)
