"""Drawing of the synthetic dives: a numpy rasteriser of capsules and ellipses (no plotting library).

Geometry is defined in units of ``u = height / 128`` pixels so a different frame size draws the same
scene. Screen coordinates: x to the right, y down. :mod:`deepsports.data.synth` decides *what* is
drawn (the generative rule); this module only draws it. Frames are ``uint8`` arrays ``(H, W, 3)`` RGB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BODY_RGB = np.array([250.0, 150.0, 60.0], dtype=np.float32)
HEAD_RGB = np.array([255.0, 240.0, 110.0], dtype=np.float32)
SPLASH_RGB = np.array([248.0, 250.0, 255.0], dtype=np.float32)
BOARD_RGB = np.array([215.0, 215.0, 205.0], dtype=np.float32)
PILLAR_RGB = np.array([78.0, 78.0, 88.0], dtype=np.float32)
WATER_RGB = np.array([18.0, 78.0, 182.0], dtype=np.float32)
RIPPLE_RGB = np.array([48.0, 112.0, 212.0], dtype=np.float32)

# Body model in body units (u), origin at the hip, +y towards the head.
# Thick limbs: frames are squeezed about 2x horizontally when resized to the model's square input.
_SHOULDER_Y, _NECK_Y, _HEAD_Y = 16.5, 17.9, 24.0
_THIGH, _SHIN, _ARM = 11.75, 11.75, 15.0
_TORSO_R, _LIMB_R, _HEAD_R = 5.2, 4.1, 6.7
#: Pose of each position (hip flexion, knee flexion, arm angle from "arms up", degrees); 0 free/straight, 1 pike, 2 tuck.
POSITION_POSES = {0: (0.0, 0.0, 180.0), 1: (145.0, 0.0, 160.0), 2: (140.0, 150.0, 140.0)}
_STAND_POSE = (0.0, 0.0, 0.0)
#: Units per frame the diver drifts away from the board in flight.
HORIZONTAL_SPEED = 2.4


@dataclass(frozen=True)
class Scene:
    """One whole video's static set: where the board and the water are, and its colours."""

    height: int
    width: int
    side: int  # +1: board on the left, dives travel right; -1: mirrored
    board_y: float  # top of the board, pixels
    water_y: float  # water line, pixels
    tint: tuple[float, float, float]
    stands: tuple[tuple[float, float, float, float, float], ...]  # (x0, y0, x1, y1, shade) of background blocks
    ripple_phase: float

    @property
    def unit(self) -> float:
        return self.height / 128.0

    @property
    def tip_x(self) -> float:
        return self.width / 2 - self.side * 24.0 * self.unit


@dataclass(frozen=True)
class Dive:
    """Everything visible about one dive (the causes of its scores)."""

    somersaults: float  # 1.0 .. 4.5 in half steps
    position: int  # 0 free/straight, 1 pike, 2 tuck
    rotation_type: int  # 0 forward, 1 back, 2 reverse, 3 inward: direction only, not scored
    entry_quality: float  # 1 = vertical rip entry with a tiny splash
    form_quality: float  # 1 = legs together, straight knees, tight arms, no wobble
    tilt_sign: int
    n_pre: int
    n_flight: int
    n_post: int
    noise_seed: int

    @property
    def num_frames(self) -> int:
        return self.n_pre + self.n_flight + self.n_post

    def splash_size(self, unit: float) -> tuple[float, float]:
        """(width, height) in pixels of the fully grown splash plume."""
        miss = 1.0 - self.entry_quality
        return (10.0 + 34.0 * miss) * unit, (6.0 + 36.0 * miss) * unit


# --------------------------------------------------------------------------------------------
# Rasterising
# --------------------------------------------------------------------------------------------

class Canvas:
    """A float32 (H, W, 3) work frame over a static background that only redraws what was touched.

    Copying and converting whole frames dominated the drawing time; a dive touches a few
    thousand pixels, so only those regions are converted to uint8 and restored afterwards.
    """

    def __init__(self, bg: np.ndarray) -> None:
        self.bg = bg
        self.bg_uint8 = finish(bg)
        self.pixels = bg.copy()
        self.shape = bg.shape
        self._dirty: list[tuple[int, int, int, int]] = []
        self._clip_frames = np.empty((0, *bg.shape), dtype=np.uint8)

    def clip_buffer(self, num_frames: int) -> np.ndarray:
        """A reused uint8 (T, H, W, 3) buffer: fresh memory costs a page fault per 4 KiB, more than the drawing."""
        if len(self._clip_frames) < num_frames:
            self._clip_frames = np.empty((num_frames, *self.shape), dtype=np.uint8)
        return self._clip_frames[:num_frames]

    def region(self, box: tuple[int, int, int, int]) -> np.ndarray:
        x0, y0, x1, y1 = box
        self._dirty.append(box)
        return self.pixels[y0:y1, x0:x1]

    def frame(self, out: np.ndarray | None = None) -> np.ndarray:
        """The finished uint8 frame (written into ``out`` if given); the work frame is reset to the background."""
        if out is None:
            out = np.empty_like(self.bg_uint8)
        np.copyto(out, self.bg_uint8)
        for x0, y0, x1, y1 in self._dirty:
            out[y0:y1, x0:x1] = finish(self.pixels[y0:y1, x0:x1])
        for x0, y0, x1, y1 in self._dirty:
            self.pixels[y0:y1, x0:x1] = self.bg[y0:y1, x0:x1]
        self._dirty.clear()
        return out


def _bbox(canvas: Canvas, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int] | None:
    h, w = canvas.shape[:2]
    ix0, iy0 = max(int(math.floor(x0)) - 1, 0), max(int(math.floor(y0)) - 1, 0)
    ix1, iy1 = min(int(math.ceil(x1)) + 2, w), min(int(math.ceil(y1)) + 2, h)
    return None if ix0 >= ix1 or iy0 >= iy1 else (ix0, iy0, ix1, iy1)


def _blend(canvas: Canvas, box: tuple[int, int, int, int], coverage: np.ndarray, rgb: np.ndarray,
           alpha: float) -> None:
    region = canvas.region(box)
    region += (alpha * coverage)[..., None] * (rgb - region)


def capsule_coverage(segments: np.ndarray, radii: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Per-segment anti-aliased coverage (S, h, w) in ``box`` of thick segments (S, 4) = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    px = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, None, :]
    py = (np.arange(y0, y1, dtype=np.float32) + 0.5)[None, :, None]
    seg = segments.astype(np.float32)
    ax, ay = seg[:, 0, None, None], seg[:, 1, None, None]
    dx, dy = seg[:, 2, None, None] - ax, seg[:, 3, None, None] - ay
    inv_len2 = 1.0 / np.maximum(dx * dx + dy * dy, 1e-6)
    ex, ey = px - ax, py - ay  # small (S, 1, w) and (S, h, 1): the per-pixel work is the broadcast below
    t = np.clip(ex * (dx * inv_len2) + ey * (dy * inv_len2), 0.0, 1.0)
    qx, qy = ex - t * dx, ey - t * dy
    dist = np.sqrt(qx * qx + qy * qy)
    return np.clip((radii.astype(np.float32) + 0.5)[:, None, None] - dist, 0.0, 1.0)


def segments_box(canvas: Canvas, segments: np.ndarray, reach: float) -> tuple[int, int, int, int] | None:
    return _bbox(canvas, segments[:, [0, 2]].min() - reach, segments[:, [1, 3]].min() - reach,
                 segments[:, [0, 2]].max() + reach, segments[:, [1, 3]].max() + reach)


def draw_capsules(canvas: Canvas, segments: np.ndarray, radii: np.ndarray, rgb: np.ndarray,
                  alpha: float = 1.0) -> None:
    """Anti-aliased thick segments (S, 4) = (x0, y0, x1, y1) with radii (S,), drawn in place."""
    box = segments_box(canvas, segments, float(radii.max()) + 1.0)
    if box is not None:
        _blend(canvas, box, capsule_coverage(segments, radii, box).max(axis=0), rgb, alpha)


def draw_ellipse(canvas: Canvas, cx: float, cy: float, ax: float, ay: float, rgb: np.ndarray,
                 alpha: float = 1.0, upper_only_below: float | None = None) -> None:
    """Filled anti-aliased ellipse; with ``upper_only_below`` rows at or below that y are left out."""
    if ax <= 0.2 or ay <= 0.2:
        return
    box = _bbox(canvas, cx - ax, cy - ay, cx + ax, cy + ay)
    if box is None:
        return
    x0, y0, x1, y1 = box
    px = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, :]
    py = (np.arange(y0, y1, dtype=np.float32) + 0.5)[:, None]
    level = 1.0 - ((px - cx) / ax) ** 2 - ((py - cy) / ay) ** 2
    coverage = np.clip(level * (min(ax, ay) / 2.0) + 0.5, 0.0, 1.0)
    if upper_only_below is not None:
        coverage = coverage * (py < upper_only_below)
    _blend(canvas, box, coverage, rgb, alpha)


# --------------------------------------------------------------------------------------------
# The scene
# --------------------------------------------------------------------------------------------

def background(scene: Scene) -> np.ndarray:
    """The static part of every frame of a video: wall, stands, board, pillar and water, float32 (H, W, 3)."""
    h, w, u = scene.height, scene.width, scene.unit
    tint = np.array(scene.tint, dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    top, bottom = np.array([22.0, 26.0, 44.0]) + tint, np.array([52.0, 58.0, 80.0]) + tint
    canvas = np.array(np.broadcast_to(top + ramp * (bottom - top), (h, w, 3)), dtype=np.float32, order="C")
    for x0, y0, x1, y1, shade in scene.stands:
        canvas[int(y0):int(y1), int(x0):int(x1)] += shade
    edge = 0.0 if scene.side > 0 else float(w)
    board_x0, board_x1 = sorted((edge, scene.tip_x))
    by0, by1 = int(round(scene.board_y)), int(round(scene.board_y + 3 * u))
    canvas[by0:by1, int(board_x0):int(round(board_x1))] = BOARD_RGB
    pillar_x = scene.tip_x - scene.side * 20 * u
    px0, px1 = sorted((pillar_x, pillar_x - scene.side * 9 * u))
    canvas[by1:int(scene.water_y), int(px0):int(px1)] = PILLAR_RGB
    water_rows = np.linspace(1.0, 0.7, h - int(scene.water_y), dtype=np.float32)[:, None, None]
    canvas[int(scene.water_y):] = (WATER_RGB + tint / 2) * water_rows
    return canvas


def draw_ripples(canvas: Canvas, scene: Scene, frame_index: int) -> None:
    """Two drifting ripple lines: motion everywhere, so a model cannot find the diver by motion alone."""
    u = scene.unit
    for depth, speed in ((6.0, 0.45), (15.0, 0.3)):
        y = scene.water_y + depth * u + 1.5 * u * math.sin(scene.ripple_phase + speed * frame_index)
        row = int(round(y))
        if row < scene.height:
            line = canvas.region((0, row, scene.width, row + 1))
            line += 0.5 * (RIPPLE_RGB - line)


# --------------------------------------------------------------------------------------------
# The diver
# --------------------------------------------------------------------------------------------

def _unit(angle_deg: float) -> tuple[float, float]:
    a = math.radians(angle_deg)
    return math.sin(a), math.cos(a)


def body_segments(hip_flex: float, knee_flex: float, arm_angle: float, splay: float,
                  arm_flail: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Body-frame capsules (S, 4) and radii (S,) of a pose; +x is the diver's front, +y the head. Angles in degrees."""
    segs, radii = [(0.0, 0.0, 0.0, _NECK_Y)], [_TORSO_R]
    for side in (-1.0, 1.0):
        sx, sy = _unit(hip_flex + side * splay)  # thigh rotated from "down" towards the front
        knee = (sx * _THIGH, -sy * _THIGH)
        kx, ky = _unit(hip_flex + side * splay - knee_flex)
        foot = (knee[0] + kx * _SHIN, knee[1] - ky * _SHIN)
        segs += [(0.0, 0.0, *knee), (*knee, *foot)]
        radii += [_LIMB_R, _LIMB_R]
    for flail in arm_flail:
        ax, ay = _unit(arm_angle + flail)  # arm rotated from "up" towards the front
        segs.append((0.0, _SHOULDER_Y, ax * _ARM, _SHOULDER_Y + ay * _ARM))
        radii.append(_LIMB_R * 0.85)
    return np.array(segs, dtype=np.float32), np.array(radii, dtype=np.float32)


def place(segments: np.ndarray, hip: tuple[float, float], theta_deg: float, facing: float, unit: float) -> np.ndarray:
    """Body frame -> screen pixels: rotate by ``theta`` (0 = upright, positive turns the head towards +x)."""
    s, c = _unit(theta_deg)
    right, up = np.array([c, s]) * facing, np.array([s, -c])
    out = np.empty_like(segments)
    for i in (0, 2):
        bx, by = segments[:, i], segments[:, i + 1]
        out[:, i] = hip[0] + unit * (bx * right[0] + by * up[0])
        out[:, i + 1] = hip[1] + unit * (bx * right[1] + by * up[1])
    return out


def draw_diver(canvas: Canvas, scene: Scene, exposures: list[tuple[tuple[float, float], float, tuple, float]],
               facing: float) -> None:
    """The diver at one or more sub-frame exposures ``(hip, theta, pose, alpha)``, oldest first (motion blur)."""
    u = scene.unit
    placed, radii = [], []
    for hip, theta, pose, _ in exposures:
        segs, seg_radii = body_segments(*pose)
        segs = np.concatenate([segs, np.array([[0.0, _HEAD_Y, 0.0, _HEAD_Y]], dtype=np.float32)])
        placed.append(place(segs, hip, theta, facing, u))
        radii.append(np.append(seg_radii, np.float32(_HEAD_R)) * u)
    all_segs, all_radii = np.concatenate(placed), np.concatenate(radii)
    box = segments_box(canvas, all_segs, float(all_radii.max()) + 1.0)
    if box is None:
        return
    coverage = capsule_coverage(all_segs, all_radii, box)
    per_exposure = len(placed[0])
    for index, (_, _, _, alpha) in enumerate(exposures):
        own = coverage[index * per_exposure:(index + 1) * per_exposure]
        _blend(canvas, box, own[:-1].max(axis=0), BODY_RGB, alpha)
        _blend(canvas, box, own[-1], HEAD_RGB, alpha)


def draw_splash(canvas: Canvas, scene: Scene, dive: Dive, x: float, growth: float,
                droplets: np.ndarray) -> None:
    """A white plume above the entry point, foam on the surface and droplets; all scale with the splash size."""
    if growth <= 0:
        return
    width, height = dive.splash_size(scene.unit)
    u, wy = scene.unit, scene.water_y
    draw_ellipse(canvas, x, wy, width / 2 * math.sqrt(growth), height * growth, SPLASH_RGB,
                 upper_only_below=wy + 0.5)
    draw_ellipse(canvas, x, wy + 2 * u, 0.9 * width * math.sqrt(growth), (2.0 + 3.0 * (1 - dive.entry_quality)) * u,
                 SPLASH_RGB, alpha=0.85)
    if len(droplets):
        centres = np.column_stack([x + droplets[:, 0] * width * growth, wy - droplets[:, 1] * height * growth])
        draw_capsules(canvas, np.concatenate([centres, centres], axis=1), droplets[:, 2] * u, SPLASH_RGB, 0.9)


def finish(canvas: np.ndarray) -> np.ndarray:
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# A whole clip
# --------------------------------------------------------------------------------------------

_BLUR_ALPHAS = (0.3, 0.55, 1.0)  # sub-frame exposures, oldest first: fast rotation leaves a wide fan


def _smoothstep(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3 - 2 * x)


def head_first(dive: Dive) -> bool:
    """A dive with a half somersault left over enters head first; whole somersaults enter feet first."""
    return (2 * dive.somersaults) % 2 == 1


def trajectory(scene: Scene, dive: Dive) -> tuple[tuple[float, float], tuple[float, float], float, float]:
    """(takeoff hip, entry hip, launch speed, gravity) in pixels per flight: more somersaults fly higher."""
    u, side = scene.unit, scene.side
    hip0 = (scene.tip_x - side * 3 * u, scene.board_y - (_THIGH + _SHIN) * u)
    # Constant horizontal speed: a longer flight (more somersaults) enters farther from the board.
    hip1 = (hip0[0] + side * HORIZONTAL_SPEED * dive.n_flight * u, scene.water_y + 8 * u)
    rise = (2.5 + 4.0 * dive.somersaults) * u
    drop = hip1[1] - hip0[1]
    speed = 2 * rise * (1 + math.sqrt(1 + drop / rise))
    return hip0, hip1, speed, speed * speed / (2 * rise)


def render_clip(canvas: Canvas, scene: Scene, dive: Dive, first_frame: int) -> np.ndarray:
    """All frames of one dive, uint8 (T, H, W, 3) with T = dive.num_frames; ``first_frame`` only phases the ripples.

    The array is the canvas's reused buffer: it holds this clip until the next ``render_clip`` on the canvas.
    """
    u, side = scene.unit, scene.side
    rng = np.random.default_rng(dive.noise_seed)
    wobble = rng.standard_normal(dive.n_flight)
    flail = rng.standard_normal((dive.n_flight, 2))
    miss = 1.0 - dive.entry_quality
    n_drops = int(round(2 + 10 * miss))  # (dx, dy) in splash sizes and radius in units of each droplet
    droplets = np.column_stack([rng.uniform(-0.9, 0.9, n_drops), rng.uniform(0.2, 1.3, n_drops),
                                rng.uniform(1.0, 2.0, n_drops)])
    sloppy = 1.0 - dive.form_quality
    rot_dir = 1.0 if dive.rotation_type in (0, 1) else -1.0  # forward/back turn towards the water
    facing = side * (1.0 if dive.rotation_type in (0, 2) else -1.0)  # forward/reverse face the water
    total_turn = side * rot_dir * 360.0 * dive.somersaults
    hip0, hip1, speed, gravity = trajectory(scene, dive)
    target = POSITION_POSES[dive.position]
    entry_arms = 0.0 if head_first(dive) else 180.0
    knee_fault = sloppy * 40.0 if dive.position != 2 else 0.0

    def pose_at(f: float, i: int) -> tuple:
        tucked = _smoothstep(min(f / 0.2, (0.88 - f) / 0.14))
        open_pose = _STAND_POSE if f < 0.5 else (0.0, 0.0, entry_arms)
        hip_flex, knee, arm = (o + tucked * (t - o) for o, t in zip(open_pose, target))
        return (hip_flex, knee + knee_fault, arm, sloppy * 22.0, tuple(sloppy * 50.0 * flail[i]))

    frames = canvas.clip_buffer(dive.num_frames)
    for k in range(dive.num_frames):
        if k < dive.n_pre:
            crouch = k == dive.n_pre - 1
            hip = (hip0[0], hip0[1] + (2.0 * u if crouch else 0.0))
            draw_ripples(canvas, scene, first_frame + k)
            draw_diver(canvas, scene, [(hip, 0.0, (0.0, 30.0 if crouch else 0.0, 0.0, 0.0, (0.0, 0.0)), 1.0)], facing)
        elif k < dive.n_pre + dive.n_flight:
            i = k - dive.n_pre
            exposures = []
            for sub, alpha in enumerate(_BLUR_ALPHAS):
                f = (i + 1 - (len(_BLUR_ALPHAS) - 1 - sub) / len(_BLUR_ALPHAS)) / dive.n_flight
                hip = (hip0[0] + (hip1[0] - hip0[0]) * f, hip0[1] - speed * f + gravity * f * f / 2)
                theta = total_turn * f + sloppy * 8.0 * wobble[i] + dive.tilt_sign * miss * 35.0 * f * f
                exposures.append((hip, theta, pose_at(f, i), alpha))
            draw_diver(canvas, scene, exposures, facing)
            if hip[1] + 38 * u > scene.water_y:  # part of the body is under water: barely seen there
                wy = int(scene.water_y)
                water = canvas.region((0, wy, scene.width, scene.height))
                water += 0.75 * (canvas.bg[wy:] - water)
            draw_ripples(canvas, scene, first_frame + k)
            if i == dive.n_flight - 1:
                draw_splash(canvas, scene, dive, hip1[0], 0.35, droplets)
        else:
            j = k - dive.n_pre - dive.n_flight
            growth = min(1.0, (j + 2) / 3) * (1.0 - 0.3 * j / max(1, dive.n_post - 1))
            draw_ripples(canvas, scene, first_frame + k)
            draw_splash(canvas, scene, dive, hip1[0], growth, droplets)
        canvas.frame(out=frames[k])
    return frames


def render_empty(canvas: Canvas, scene: Scene, frame_index: int) -> np.ndarray:
    """A frame between dives: the empty board and the water."""
    draw_ripples(canvas, scene, frame_index)
    return canvas.frame()
