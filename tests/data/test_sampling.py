"""Frame sampling: the original's five methods on hand-computed cases, plus their invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepsports.config import FRAME_METHODS
from deepsports.data.sampling import sample_indices
from deepsports.errors import DataError


class _Draws:
    """A generator stand-in that returns chosen uniform draws, so expected frames can be worked out by hand."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self, size: int | None = None):
        if size is None:
            return self.values.pop(0)
        out, self.values = np.array(self.values[:size]), self.values[size:]
        return out


def _frames(method: str, n: int, k: int, offset: int, rng) -> list[int]:
    return sample_indices(method, n, k, offset, rng).tolist()


# ---- hand-computed cases (n frames, k samples, offset = start_frame, step = n / k) --------------

def test_spaced_fixed_hand_computed() -> None:
    # step 2.5: 100 + [0, 2.5, 5, 7.5] -> truncated
    assert _frames("spaced_fixed", 10, 4, 100, np.random.default_rng(0)) == [100, 102, 105, 107]
    # the original's comment: 80 frames, 8 samples -> every 10th frame
    assert _frames("spaced_fixed", 80, 8, 0, np.random.default_rng(0)) == [0, 10, 20, 30, 40, 50, 60, 70]
    # step 86/8 = 10.75 on clip (1, 1) of MTL-AQA (frames 7377..7462)
    assert _frames("spaced_fixed", 86, 8, 7377, None) == [7377, 7387, 7398, 7409, 7420, 7430, 7441, 7452]


def test_spaced_varied_shifts_the_whole_clip_once() -> None:
    # r = 0.5 -> shift 1.25: 101.25, 103.75, 106.25, 108.75
    assert _frames("spaced_varied", 10, 4, 100, _Draws(0.5)) == [101, 103, 106, 108]
    # r = 0.99 -> shift 2.475: 102.475, 104.975, 107.475, 109.975 (never past the clip's last frame 109)
    assert _frames("spaced_varied", 10, 4, 100, _Draws(0.99)) == [102, 104, 107, 109]
    # r = 0 is spaced_fixed
    assert _frames("spaced_varied", 10, 4, 100, _Draws(0.0)) == [100, 102, 105, 107]


def test_spaced_fixed_new_is_spaced_varied_as_in_the_original() -> None:
    assert _frames("spaced_fixed_new", 10, 4, 100, _Draws(0.5)) == [101, 103, 106, 108]
    for seed in range(200):
        n, k = 20 + seed, 1 + seed % 17
        assert (_frames("spaced_fixed_new", n, k, 7 * seed, np.random.default_rng(seed))
                == _frames("spaced_varied", n, k, 7 * seed, np.random.default_rng(seed)))


def test_spaced_varied_new_shifts_each_sample_independently() -> None:
    # shifts 0.1*2.5, 0.9*2.5, 0.5*2.5, 0.0: 100.25, 104.75, 106.25, 107.5
    assert _frames("spaced_varied_new", 10, 4, 100, _Draws(0.1, 0.9, 0.5, 0.0)) == [100, 104, 106, 107]


def test_random_is_a_sorted_distinct_sample() -> None:
    rng = np.random.default_rng(3)
    frames = _frames("random", 10, 4, 100, rng)
    assert frames == sorted(frames) and len(set(frames)) == 4 and all(100 <= f <= 109 for f in frames)
    # k == n takes every frame once
    assert _frames("random", 6, 6, 50, np.random.default_rng(0)) == [50, 51, 52, 53, 54, 55]


def test_random_with_more_samples_than_frames_repeats_every_frame_evenly() -> None:
    # documented: each frame k // n times, plus k % n distinct extra frames
    frames = _frames("random", 3, 7, 10, np.random.default_rng(1))
    assert frames == sorted(frames) and len(frames) == 7
    counts = np.bincount(np.array(frames) - 10, minlength=3)
    assert sorted(counts.tolist()) == [2, 2, 3]


def test_spaced_methods_repeat_frames_when_k_exceeds_n() -> None:
    # step 0.5: [0, 0.5, 1, 1.5] + 20
    assert _frames("spaced_fixed", 2, 4, 20, None) == [20, 20, 21, 21]


def test_matches_the_originals_formulas_for_a_seeded_generator() -> None:
    """The same draws as the generator hands out, pushed through the original's expressions."""
    n, k, offset = 137, 16, 2500
    step = n / k
    draws = np.random.default_rng(42)
    r = draws.random()
    assert _frames("spaced_varied", n, k, offset, np.random.default_rng(42)) == \
        [int(i * step + (offset + r * step)) for i in range(k)]
    rs = np.random.default_rng(42).random(k)
    assert _frames("spaced_varied_new", n, k, offset, np.random.default_rng(42)) == \
        [int(i * step + offset + rs[i] * step) for i in range(k)]


# ---- invariants ---------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, database=None)  # no .hypothesis dir in the repo
@given(method=st.sampled_from(FRAME_METHODS), n=st.integers(1, 400), k=st.integers(1, 64),
       offset=st.integers(0, 300_000), seed=st.integers(0, 2**32 - 1))
def test_indices_are_sorted_in_range_and_of_length_k(method: str, n: int, k: int, offset: int, seed: int) -> None:
    frames = sample_indices(method, n, k, offset, np.random.default_rng(seed))
    assert frames.dtype == np.int64 and frames.shape == (k,)
    assert np.all(np.diff(frames) >= 0)
    assert frames.min() >= offset and frames.max() <= offset + n - 1
    if method == "random" and k <= n:
        assert len(set(frames.tolist())) == k
    if method != "random":
        step = n / k
        relative = frames - offset
        for i, value in enumerate(relative):
            # sample i lies in its own stretch [i*step, (i+1)*step) of the clip
            assert math.floor(i * step) <= value < (i + 1) * step
    again = sample_indices(method, n, k, offset, np.random.default_rng(seed))
    assert np.array_equal(frames, again)


@pytest.mark.parametrize("method", ["random", "spaced_varied", "spaced_fixed_new", "spaced_varied_new"])
def test_random_methods_depend_on_the_generator(method: str) -> None:
    results = {tuple(_frames(method, 200, 8, 0, np.random.default_rng(seed))) for seed in range(10)}
    assert len(results) > 1


def test_spaced_fixed_ignores_the_generator() -> None:
    results = {tuple(_frames("spaced_fixed", 200, 8, 0, np.random.default_rng(seed))) for seed in range(5)}
    assert len(results) == 1


@pytest.mark.parametrize("bad", [dict(method="every_other"), dict(n=0), dict(k=0)])
def test_invalid_requests_raise_data_error(bad: dict) -> None:
    args = {"method": "spaced_fixed", "n": 10, "k": 4, **bad}
    with pytest.raises(DataError, match="every_other|clip of 0 frames|frame_num must be"):
        sample_indices(args["method"], args["n"], args["k"], 0, np.random.default_rng(0))
