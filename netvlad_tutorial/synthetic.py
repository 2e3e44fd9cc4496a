"""Stage 1: a small synthetic city, written in exactly the Pittsburgh 250k layout.

The city is a street grid near Pittsburgh's UTM coordinates. Along each street stand rows of
buildings drawn from a shared library of facade styles, so that distant streets can look alike
(hard negatives). A tiny ray caster renders what a camera sees: the two facade rows, the road
and the sky.
- Database: every few metres along a street, a place with several views (yaw angles) taken on
  one day, under one light. Views of neighbouring places overlap.
- Queries: near the places, from a slightly different position, height, heading and field of
  view, under other conditions: sky, sun, haze, colour cast, exposure, blur, noise, and cars
  and pedestrians in front.

The files match the real dataset, so the same loaders serve both:
    ROOT/000/000123_pitch1_yaw3.jpg                        database views
    ROOT/queries_real/000/000456_pitch1_yaw2.jpg           queries
    ROOT/netvlad_v100_datasets/datasets/synthetic_{train,val,test}.mat
Train, val and test lie in different neighbourhoods, more than a kilometre apart.
"""

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .dbstruct import QUERIES_DIR, SPLITS, DbStruct, parse_db_struct, save_db_struct, struct_path
from .files import atomic_json, atomic_write, fault_point, folder_lock
from .utils import DATA_ENV, REPO_ROOT, default_data_root, progress_bar

DATASET_NAME = "synthetic"
ORIGIN = (585_000.0, 4_477_000.0)  # UTM zone 17T (easting, northing), as in Pittsburgh
NEIGHBOURHOODS = {"train": (0.0, 0.0), "val": (1_800.0, 600.0), "test": (1_800.0, -1_200.0)}
PITCH_DEG = {1: 4.0, 2: 26.0}  # camera elevation of pitch1 and pitch2 views
CAMERA_HEIGHT = 2.5  # metres, a car roof
FOV_DEG = 60.0
STREET_MARGIN = 24.0  # metres between an intersection and the first place of a street
FACADE_EXTENT = 50.0  # facades continue this far beyond a street's ends
TEXTURE_HEIGHT = 30.0  # metres of facade texture (buildings are at most ~28 m)
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Preset:
    """Size of a synthetic city.

    Args:
        image_size: (H, W) of every image.
        streets: number of streets per split, e.g. {"train": 6, "val": 3, "test": 3}.
        places_per_street: database places along each street, `place_spacing` metres apart.
        queries_per_street: queries along each street: one number, or one per split.
        num_yaws: database views per place and pitch (evenly spread headings).
        pitches: which of pitch1 (4 degrees up) and pitch2 (26 degrees up) to take.
    """

    image_size: tuple
    streets: dict
    places_per_street: int = 16
    queries_per_street: int | dict = 16
    num_yaws: int = 4
    pitches: tuple = (1,)
    place_spacing: float = 8.0


PRESETS = {
    # 384 / 192 / 192 database views, 96 / 144 / 432 queries: a few seconds on 2 cores. Val and
    # test have more queries per street so that one query is 0.7 points of recall, not 2; test
    # 3x val's, for the power of paired tests (0.23 points per query; RESULTS.md, "The
    # pretrained encoder").
    "tiny": Preset((96, 128), {"train": 6, "val": 3, "test": 3},
                   queries_per_street={"train": 16, "val": 48, "test": 144}),
    # 1,280 / 640 / 640 database views, 320 / 160 / 160 queries.
    "small": Preset((120, 160), {"train": 20, "val": 10, "test": 10}),
    # 64 / 32 / 32 database views, 16 / 8 / 8 queries at 32 x 48: for unit tests of training.
    "micro": Preset((32, 48), {"train": 2, "val": 1, "test": 1}, places_per_street=8,
                    queries_per_street=8),
}

# ---------------------------------------------------------------------------------------------
# Facades: a library of styles, and rows of buildings drawn from it
# ---------------------------------------------------------------------------------------------

WALL_COLOURS = [(150, 70, 55), (185, 120, 80), (200, 185, 160), (170, 170, 165),
                (120, 130, 150), (215, 205, 180), (95, 110, 90), (230, 230, 225),
                (140, 100, 80), (180, 150, 110), (90, 90, 100), (200, 160, 150)]
ACCENT_COLOURS = [(200, 40, 40), (40, 90, 170), (30, 130, 70), (220, 170, 30), (120, 50, 130),
                  (230, 110, 30), (30, 30, 35), (240, 240, 240), (0, 140, 150)]


@dataclass(frozen=True)
class FacadeStyle:
    """How a kind of building looks: colours, wall texture, windows, ground floor and roof."""

    wall: tuple
    trim: tuple
    glass: tuple
    texture: str  # "plain", "brick", "siding" or "panels"
    floor_height: float
    floors: tuple  # (min, max)
    window_size: tuple  # (width, height) in metres
    window_gap: float
    arched: bool
    shutters: tuple | None
    shop: bool
    roof: str  # "flat", "cornice" or "gable"
    roof_colour: tuple


def _pick(rng, options):
    """One of `options`, uniformly."""
    return options[rng.integers(len(options))]


def _jitter(rng, colour, amount):
    """`colour` with each channel moved by up to `amount`."""
    shift = rng.integers(-amount, amount + 1, 3)
    return tuple(min(255, max(0, int(c + d))) for c, d in zip(colour, shift))


def make_styles(rng, n=12):
    """A library of `n` facade styles, shared by every street of the city."""
    styles = []
    for i in range(n):
        wall = _jitter(rng, WALL_COLOURS[i % len(WALL_COLOURS)], 12)
        dark_trim = sum(wall) > 450
        styles.append(FacadeStyle(
            wall=wall,
            trim=_jitter(rng, (60, 55, 50) if dark_trim else (235, 230, 220), 15),
            glass=_jitter(rng, (55, 70, 90), 20),
            texture=_pick(rng, ["plain", "brick", "siding", "panels"]),
            floor_height=float(rng.uniform(3.0, 4.0)),
            floors=_pick(rng, [(2, 3), (3, 4), (4, 6), (5, 6)]),
            window_size=(float(rng.uniform(0.8, 1.6)), float(rng.uniform(1.3, 2.2))),
            window_gap=float(rng.uniform(0.7, 1.8)),
            arched=bool(rng.random() < 0.3),
            shutters=_pick(rng, ACCENT_COLOURS) if rng.random() < 0.3 else None,
            shop=bool(rng.random() < 0.5),
            roof=_pick(rng, ["flat", "cornice", "gable"]),
            roof_colour=_jitter(rng, _pick(rng, [(80, 60, 55), (60, 60, 65), (120, 70, 50)]), 10),
        ))
    return styles


class _Canvas:
    """A facade texture in metres: x along the street from `x0`, z up from the ground."""

    def __init__(self, x0, length, ppm):
        self.x0, self.ppm = x0, ppm
        self.height = round(TEXTURE_HEIGHT * ppm)
        self.image = Image.new("RGBA", (round(length * ppm), self.height), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)

    def box(self, x, z):
        """Pixel box (at least one pixel) of the metre box x[0]..x[1], z[0]..z[1]."""
        left, top = round((x[0] - self.x0) * self.ppm), round(self.height - z[1] * self.ppm)
        right = round((x[1] - self.x0) * self.ppm) - 1
        bottom = round(self.height - z[0] * self.ppm) - 1
        return [left, top, max(left, right), max(top, bottom)]

    def rect(self, x, z, fill, outline=None, width=0.0):
        self.draw.rectangle(self.box(x, z), fill=fill, outline=outline,
                            width=max(1, round(width * self.ppm)) if outline else 0)

    def ellipse(self, x, z, fill):
        self.draw.ellipse(self.box(x, z), fill=fill)

    def polygon(self, points, fill):
        self.draw.polygon([((x - self.x0) * self.ppm, self.height - z * self.ppm)
                           for x, z in points], fill=fill)


def _draw_window(canvas, rng, style, x, z):
    """One window with its frame, centred at x, sill at height z."""
    (w, h), trim = style.window_size, style.trim
    lit = rng.random() < 0.15
    glass = (230, 200, 110) if lit else _jitter(rng, style.glass, 25)
    box_x, box_z = (x - w / 2, x + w / 2), (z, z + h)
    canvas.rect(box_x, box_z, fill=glass, outline=trim, width=0.12)
    if style.arched:
        canvas.ellipse(box_x, (z + h - w / 2, z + h + w / 2), fill=trim)
        canvas.ellipse((x - w / 2 + 0.12, x + w / 2 - 0.12), (z + h - w / 2 + 0.12,
                       z + h + w / 2 - 0.12), fill=glass)
    canvas.rect((x - 0.04, x + 0.04), box_z, fill=trim)  # mullion
    if style.shutters is not None:
        for side in (-1, 1):
            canvas.rect(sorted((x + side * w / 2, x + side * (w / 2 + 0.3))), box_z,
                        fill=style.shutters)


def _draw_building(canvas, rng, style, x0, x1):
    """One building between x0 and x1 (metres along the street)."""
    fh, (lo, hi) = style.floor_height, style.floors
    floors = int(rng.integers(lo, hi + 1))
    top = floors * fh
    wall = _jitter(rng, style.wall, 10)
    canvas.rect((x0, x1), (0, top), fill=wall)
    line = tuple(int(c * 0.8) for c in wall)
    if style.texture in ("brick", "siding"):
        step = 0.3 if style.texture == "brick" else 0.22
        for z in np.arange(step, top, step):
            canvas.rect((x0, x1), (z, z + 0.04), fill=line)
    elif style.texture == "panels":
        for x in np.arange(x0 + 1.5, x1, 1.5):
            canvas.rect((x, x + 0.06), (0, top), fill=line)
    # Windows on the upper floors, centred on the building.
    w, gap = style.window_size[0], style.window_gap
    n = max(1, int((x1 - x0 - 1.0) // (w + gap)))
    xs = (x0 + x1) / 2 + (np.arange(n) - (n - 1) / 2) * (w + gap)
    sill = (fh - style.window_size[1]) * 0.55
    for f in range(1, floors):
        for x in xs:
            _draw_window(canvas, rng, style, x, f * fh + sill)
    # Ground floor: a shop front with its sign, or a door among windows.
    if style.shop:
        canvas.rect((x0 + 0.4, x1 - 0.4), (fh - 1.0, fh - 0.3), fill=_pick(rng, ACCENT_COLOURS))
        canvas.rect((x0 + 0.6, x1 - 0.6), (0.3, fh - 1.3), fill=_jitter(rng, style.glass, 30),
                    outline=style.trim, width=0.15)
        for x in np.arange(x0 + 2.5, x1 - 1.0, 2.5):
            canvas.rect((x - 0.06, x + 0.06), (0.3, fh - 1.3), fill=style.trim)
    else:
        door = int(rng.integers(n))
        for i, x in enumerate(xs):
            if i == door:
                canvas.rect((x - 0.6, x + 0.6), (0, 2.3), fill=_pick(rng, ACCENT_COLOURS),
                            outline=style.trim, width=0.1)
            else:
                _draw_window(canvas, rng, style, x, sill)
    # Roof line.
    if style.roof == "cornice":
        canvas.rect((x0, x1), (top - 0.5, top + 0.3), fill=style.trim)
    elif style.roof == "gable":
        rise = min(0.35 * (x1 - x0), 5.0)
        canvas.polygon([(x0, top), (x1, top), ((x0 + x1) / 2, top + rise)], style.roof_colour)
    else:
        canvas.rect((x0, x1), (top - 0.25, top), fill=style.roof_colour)


def draw_facade_row(rng, styles, x0, length, ppm):
    """A row of buildings (and street trees) along `length` metres from `x0`: RGBA array.

    Pixel (row, col) shows the point at height `TEXTURE_HEIGHT - (row + 0.5) / ppm` and
    `x0 + (col + 0.5) / ppm` along the street; alpha 0 is sky.
    """
    canvas = _Canvas(x0, length, ppm)
    x = x0
    while x < x0 + length:
        width = float(rng.uniform(7.0, 18.0))
        _draw_building(canvas, rng, _pick(rng, styles), x, x + width)
        gap = float(rng.uniform(0.0, 2.0)) if rng.random() < 0.4 else 0.0
        if gap:  # an alley behind a low wall
            canvas.rect((x + width, x + width + gap), (0, 3.0), fill=(70, 70, 75))
        x += width + gap
    x = x0 + float(rng.uniform(5, 20))
    while x < x0 + length:  # street trees, drawn flat against the facades
        r = float(rng.uniform(1.2, 2.4))
        canvas.rect((x - 0.15, x + 0.15), (0, 3.5), fill=(90, 65, 45))
        canvas.ellipse((x - r, x + r), (3.0, 3.0 + 1.8 * r),
                       fill=_jitter(rng, (60, 110, 50), 20))
        x += float(rng.uniform(12, 35))
    return np.asarray(canvas.image)


# ---------------------------------------------------------------------------------------------
# Streets, cameras and the ray caster
# ---------------------------------------------------------------------------------------------


@dataclass
class Street:
    """A straight street: its frame in UTM and its two facade rows.

    Street coordinates: x along the street from `origin` (metres), y to the left, z up.
    """

    origin: np.ndarray  # (2,) UTM of x = 0
    direction: np.ndarray  # (2,) unit vector of +x
    half_width: float  # facades at y = +-half_width
    road_half_width: float  # asphalt for |y| < road_half_width, sidewalks beyond
    left: np.ndarray  # (Ht, Wt, 4) facade row at y = +half_width
    right: np.ndarray  # (Ht, Wt, 4) facade row at y = -half_width
    x0: float  # street x of the facade rows' first column
    ppm: float  # facade texture pixels per metre
    asphalt: np.ndarray  # (3,) colours
    sidewalk: np.ndarray

    def to_utm(self, x, y=0.0):
        """UTM (easting, northing) of street points x, y: (N, 2)."""
        normal = np.array([-self.direction[1], self.direction[0]])
        return (self.origin + np.multiply.outer(x, self.direction)
                + np.multiply.outer(y, normal))


@dataclass(frozen=True)
class Camera:
    """A pinhole camera in street coordinates; angles in degrees (heading 0 = along +x)."""

    x: float
    y: float
    z: float
    heading: float
    pitch: float
    fov: float = FOV_DEG


@dataclass(frozen=True)
class Look:
    """Conditions of a capture: sky gradient, haze, and the light on each surface."""

    sky_top: tuple
    sky_horizon: tuple
    fog: float  # metres over which haze takes over (exponential)
    light: tuple  # brightness of (left facades, right facades, ground)


# Asphalt and paving grain: one fixed 64 x 64 noise tile (the same in every city).
GRAIN = np.random.default_rng(12345).normal(0.0, 1.0, (64, 64)).astype(np.float32)


def _ground_colour(street, gx, gy):
    """Road and sidewalk colours at ground points (street coordinates): (N, 3)."""
    ay = np.abs(gy)
    road = ay < street.road_half_width
    colour = np.where(road[:, None], street.asphalt, street.sidewalk).astype(np.float32)
    colour += 10 * GRAIN[(gx * 6).astype(np.int64) % 64, (gy * 6).astype(np.int64) % 64, None]
    tiles = ~road & (((gx % 1.5) < 0.06) | (((ay - street.road_half_width) % 1.5) < 0.06))
    kerb = np.abs(ay - street.road_half_width) < 0.2
    dashes = road & (ay < 0.12) & ((gx % 6.0) < 3.0)
    colour[tiles] *= 0.8
    colour[kerb] = (175, 175, 170)
    colour[dashes] = (225, 200, 80)
    return colour


def render(street, cam, look, size, supersample=2):
    """The view of camera `cam` on `street` under `look`: a PIL image of `size` (H, W).

    Each pixel casts a ray; the first surface it meets (facade plane or ground) gives its
    colour, fading into haze with distance; rays that meet neither show the sky.
    """
    h, w = size[0] * supersample, size[1] * supersample
    tan_half = np.tan(np.radians(cam.fov) / 2)
    a = ((np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1) * tan_half  # (W,) to the right
    b = (1 - (np.arange(h, dtype=np.float32) + 0.5) / h * 2) * tan_half * h / w  # (H,) up
    a, b = a[None, :], b[:, None]
    cy, sy = math.cos(math.radians(cam.heading)), math.sin(math.radians(cam.heading))
    cp, sp = math.cos(math.radians(cam.pitch)), math.sin(math.radians(cam.pitch))
    forward, right, up = (cy * cp, sy * cp, sp), (sy, -cy, 0.0), (-cy * sp, -sy * sp, cp)
    # Ray directions forward + a * right + b * up: `dx`, `dy`, `dz`, `length`: (H*W,) each.
    dx, dy, dz = ((f + a * r + b * u).ravel() for f, r, u in zip(forward, right, up))
    length = np.sqrt(1 + a ** 2 + b ** 2).ravel()
    colour = np.empty((h * w, 3), np.float32)
    sky_horizon = np.array(look.sky_horizon, np.float32)

    def fade(rgb, t, idx):
        """Surface colours seen at ray distances `t`, fading into the haze."""
        haze = np.exp(t * length[idx] / np.float32(-look.fog))[:, None]  # 1 near, 0 far
        return rgb * haze + sky_horizon * (1 - haze)

    # Distances along each ray to the ground (z = 0) and to the facade plane it faces.
    with np.errstate(divide="ignore"):
        t_ground = np.where(dz < 0, -cam.z / dz, np.inf)
        t_wall = np.where(dy != 0, (np.sign(dy) * street.half_width - cam.y) / dy, np.inf)
    ground = np.flatnonzero(t_ground <= t_wall)
    t = t_ground[ground]
    rgb = _ground_colour(street, cam.x + t * dx[ground], cam.y + t * dy[ground])
    colour[ground] = fade(rgb * np.float32(look.light[2]), t, ground)
    sky = t_ground > t_wall  # so far: rays that do not meet the ground first

    for side, row, light in ((1, street.left, look.light[0]), (-1, street.right, look.light[1])):
        hit = np.flatnonzero((np.sign(dy) == side) & sky)
        t = t_wall[hit]
        rows, cols = row.shape[:2]
        col = ((cam.x + t * dx[hit] - street.x0) * street.ppm).clip(-1, cols).astype(np.int64)
        r = rows - 1 - ((cam.z + t * dz[hit]) * street.ppm).clip(-1, rows).astype(np.int64)
        inside = (col >= 0) & (col < cols) & (r >= 0) & (r < rows)
        hit, t = hit[inside], t[inside]
        # One 4-byte RGBA texel per hit, read as one uint32 (a faster gather).
        texel = row.view(np.uint32).ravel()[r[inside] * cols + col[inside]]
        texel = texel.view(np.uint8).reshape(-1, 4)  # (n, 4)
        opaque = texel[:, 3] > 0
        hit, t, rgb = hit[opaque], t[opaque], texel[opaque, :3]
        colour[hit] = fade(rgb * np.float32(light), t, hit)
        sky[hit] = False

    # Sky: a gradient from the horizon up.
    sky = np.flatnonzero(sky)
    elevation = np.sqrt(np.clip(dz[sky] / length[sky], 0, 1))[:, None]
    colour[sky] = sky_horizon + (np.array(look.sky_top, np.float32) - sky_horizon) * elevation
    image = Image.fromarray(np.clip(colour, 0, 255).astype(np.uint8).reshape(h, w, 3))
    return image.reduce(supersample) if supersample > 1 else image


# ---------------------------------------------------------------------------------------------
# Capture conditions: the database's day, and the queries' changes
# ---------------------------------------------------------------------------------------------

SKIES = {  # (top, horizon)
    "clear": ((70, 120, 200), (175, 205, 235)),
    "overcast": ((140, 142, 148), (200, 200, 198)),
    "dusk": ((55, 55, 105), (235, 150, 90)),
    "haze": ((185, 190, 195), (228, 226, 215)),
}


def database_look(rng):
    """The database's capture day on one street: clear sky, mild sun from one side."""
    top, horizon = SKIES["clear"]
    sun = rng.uniform(0.85, 1.05, 2)
    return Look(_jitter(rng, top, 10), _jitter(rng, horizon, 8), float(rng.uniform(70, 90)),
                (float(sun[0]), float(sun[1]), 1.0))


def query_camera(rng, x_min, x_max, heading):
    """A query's camera: anywhere along the street between `x_min` and `x_max`, a few metres
    off the centre line, at a person's or a car's height, about `heading`, another lens."""
    return Camera(x=float(rng.uniform(x_min, x_max)), y=float(rng.uniform(-2.5, 2.5)),
                  z=float(rng.uniform(1.8, 2.8)),
                  heading=heading + float(np.clip(rng.normal(0, 5), -10, 10)),
                  pitch=PITCH_DEG[1] + float(rng.uniform(-3, 3)), fov=float(rng.uniform(55, 65)))


def query_look(rng):
    """A query's conditions: another sky, sun direction and strength, haze."""
    top, horizon = SKIES[_pick(rng, list(SKIES))]
    light = rng.uniform(0.65, 1.1, 3)
    return Look(_jitter(rng, top, 15), _jitter(rng, horizon, 15), float(rng.uniform(50, 90)),
                tuple(float(v) for v in light))


def _draw_occluders(image, rng):
    """Cars and pedestrians in front of the camera (drawn in the image)."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(min(rng.poisson(0.9), 3)):  # cars: body, windows, wheels
        cw, ch = w * rng.uniform(0.2, 0.5), h * rng.uniform(0.1, 0.22)
        x, y = w * rng.uniform(-0.2, 0.9), h * rng.uniform(0.85, 1.05)
        body = _jitter(rng, _pick(rng, ACCENT_COLOURS + [(200, 200, 205), (40, 40, 45)]), 20)
        draw.rectangle([x, y - ch, x + cw, y - 0.2 * ch], fill=body)
        draw.rectangle([x + 0.2 * cw, y - 1.45 * ch, x + 0.8 * cw, y - 0.95 * ch], fill=body)
        draw.rectangle([x + 0.27 * cw, y - 1.35 * ch, x + 0.73 * cw, y - 1.0 * ch],
                       fill=(40, 50, 60))
        for cx in (x + 0.2 * cw, x + 0.8 * cw):
            draw.ellipse([cx - 0.2 * ch, y - 0.45 * ch, cx + 0.2 * ch, y - 0.05 * ch],
                         fill=(20, 20, 20))
    for _ in range(min(rng.poisson(0.8), 3)):  # pedestrians: legs, torso, head
        ph = h * rng.uniform(0.25, 0.5)
        pw = ph * 0.28
        x, y = w * rng.uniform(0, 1), h * rng.uniform(0.8, 1.05)
        draw.rectangle([x - pw * 0.35, y - 0.45 * ph, x + pw * 0.35, y], fill=(40, 40, 60))
        draw.rectangle([x - pw / 2, y - 0.85 * ph, x + pw / 2, y - 0.45 * ph],
                       fill=_pick(rng, ACCENT_COLOURS))
        draw.ellipse([x - pw * 0.3, y - ph, x + pw * 0.3, y - 0.85 * ph], fill=(225, 180, 150))


def degrade(image, rng):
    """A query's camera and moment: occluders, blur, exposure, colour cast and noise."""
    image = image.copy()
    _draw_occluders(image, rng)
    scale = image.size[0] / 128
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.0)) * scale))
    pixels = np.asarray(image, dtype=np.float32) / 255
    gain = rng.uniform(0.75, 1.2) * (1 + rng.uniform(-0.12, 0.12, 3))  # exposure, colour cast
    pixels = pixels ** rng.uniform(0.85, 1.2) * gain
    pixels += rng.normal(0, rng.uniform(0, 8) / 255, pixels.shape)
    return Image.fromarray(np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# The city
# ---------------------------------------------------------------------------------------------


def _street_grid(rng, num_streets, block, corner):
    """`num_streets` distinct edges of a square street grid: (start UTM, unit direction)."""
    m = 1
    while 2 * m * (m + 1) < num_streets:
        m += 1
    edges = [((i, j), (1, 0)) for i in range(m) for j in range(m + 1)]
    edges += [((i, j), (0, 1)) for i in range(m + 1) for j in range(m)]
    chosen = np.sort(rng.choice(len(edges), num_streets, replace=False))
    return [(np.add(corner, np.multiply(edges[e][0], block)), np.array(edges[e][1], float))
            for e in chosen]


def _make_street(rng, styles, origin, direction, length, ppm, right_styles=None):
    """A street of `length` metres with random width, pavement and facade rows.

    Args:
        styles: the styles the buildings are drawn from (both rows, unless `right_styles`).
    """
    half_width = float(rng.uniform(7.0, 10.0))
    x0, extent = -FACADE_EXTENT, length + 2 * FACADE_EXTENT
    return Street(origin=origin, direction=direction, half_width=half_width,
                  road_half_width=half_width - float(rng.uniform(2.5, 4.0)),
                  left=draw_facade_row(rng, styles, x0, extent, ppm),
                  right=draw_facade_row(rng, right_styles or styles, x0, extent, ppm),
                  x0=x0, ppm=ppm,
                  asphalt=np.array(_jitter(rng, (85, 85, 90), 10), np.float32),
                  sidewalk=np.array(_jitter(rng, (160, 155, 150), 15), np.float32))


def _yaw_heading(k, num_yaws):
    """Heading (degrees from the street's +x) of view `yaw{k}`, k = 1..num_yaws."""
    return (k - 0.5) * 360.0 / num_yaws


def _name(index, pitch, yaw):
    """Pittsburgh-style image name: `000/000123_pitch1_yaw3.jpg`."""
    return f"{index // 1000:03d}/{index:06d}_pitch{pitch}_yaw{yaw}.jpg"


def _save(image, path):
    """Write a JPEG (fixed quality: same pixels, same bytes)."""
    atomic_write(path, lambda f: image.save(f, "JPEG", quality=JPEG_QUALITY), sync=False)


def _make_split(root, split, preset, image_size, rng, styles, first_place, first_query):
    """Render one split's database and queries; return its `DbStruct`."""
    spacing, n_places = preset.place_spacing, preset.places_per_street
    q_per_street = preset.queries_per_street
    q_per_street = q_per_street[split] if isinstance(q_per_street, dict) else q_per_street
    length = 2 * STREET_MARGIN + (n_places - 1) * spacing
    corner = np.add(ORIGIN, NEIGHBOURHOODS[split])
    supersample = 2 if image_size[1] <= 256 else 1  # small images: 2 x 2 rays per pixel
    # Facade texels per metre: about one texel per ray on a facade 8 m away.
    ppm = float(np.clip(round(image_size[1] * supersample / 18), 16, 40))
    db_names, utm_db, q_names, utm_q = [], [], [], []
    place, query = first_place, first_query
    grid = _street_grid(rng, preset.streets[split], length, corner)
    for origin, direction in progress_bar(grid, desc=f"synthetic {split}", unit="street"):
        street = _make_street(rng, styles, origin, direction, length, ppm)
        look = database_look(rng)
        xs = STREET_MARGIN + np.arange(n_places) * spacing + rng.uniform(-1, 1, n_places)
        for x in xs:
            for pitch in preset.pitches:
                for k in range(1, preset.num_yaws + 1):
                    cam = Camera(x, 0.0, CAMERA_HEIGHT, _yaw_heading(k, preset.num_yaws),
                                 PITCH_DEG[pitch])
                    db_names.append(_name(place, pitch, k))
                    _save(render(street, cam, look, image_size, supersample),
                          root / db_names[-1])
                    utm_db.append(street.to_utm(x))
            place += 1
        for _ in range(q_per_street):
            k = int(rng.integers(1, preset.num_yaws + 1))
            cam = query_camera(rng, xs[0], xs[-1], _yaw_heading(k, preset.num_yaws))
            q_names.append(_name(query, 1, k))
            image = degrade(render(street, cam, query_look(rng), image_size, supersample), rng)
            _save(image, root / QUERIES_DIR / q_names[-1])
            utm_q.append(street.to_utm(cam.x, cam.y))
            query += 1
    return DbStruct(split, DATASET_NAME, db_names, np.array(utm_db), q_names, np.array(utm_q),
                    len(db_names), len(q_names), 25, 625, 100)


def make_synthetic_city(root, preset="tiny", seed=0, image_size=None):
    """Write a synthetic city at `root` in the Pittsburgh layout; return `root` as a Path.

    Deterministic: the same arguments give byte-identical images and the same `.mat` contents.
    The city is generated into a temporary folder next to `root` and swapped in at the end, so
    a kill leaves the old city (or nothing), never a mix. `root` must be absent, an empty
    folder, or one of our cities holding only the files it wrote (`city_files`): any other
    folder is refused, never written into, and the old city's files are deleted one by one
    by name. Writers of one `root` are serialized by `ROOT/../.ROOTNAME.lock` (`folder_lock`,
    the `filelock` library): a second one is refused while the first runs.

    Args:
        preset: "tiny" or "small" (see `PRESETS`).
        seed: the city (streets, buildings, captures) drawn from `np.random.default_rng`.
        image_size: (H, W) to override the preset's, e.g. (480, 640) like Pittsburgh.

    Raises:
        FileExistsError: `root` holds files that are not a synthetic city's.
        FolderInUseError: another process is writing `root`.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]
    image_size = tuple(image_size or config.image_size)
    root = Path(root)
    _check_replaceable(root)
    with folder_lock(root.parent / f".{root.name}.lock", root, "make-synthetic"):
        old_files = _check_replaceable(root)  # again: another writer may have just finished
        _remove_leftovers(root)
        tmp = _partial_folder(root)
        try:
            _write_city(tmp, config, preset, seed, image_size)
            fault_point("synthetic:written")
            old = None
            if root.exists():  # an empty folder or our own city: move it aside, then swap
                old = _partial_folder(root)
                os.replace(root, old / root.name)
            (tmp / PARTIAL_MARK).unlink()
            os.replace(tmp, root)
            if old is not None:
                _remove_named(old / root.name, old_files)
                if (old / root.name).exists():  # files added while the city was generated
                    (old / PARTIAL_MARK).unlink()  # kept for good, not a leftover
                    print(f"Kept {old / root.name}: it holds files that make-synthetic did "
                          "not write")
                else:
                    _remove_named(old, [PARTIAL_MARK])
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return root


PARTIAL_MARK = ".netvlad_partial"  # in each temporary folder: `_remove_leftovers` may delete it


def _partial_folder(root):
    """A new temporary folder `.ROOTNAME.XXXX.partial` beside `root`, marked as ours."""
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".partial"))
    (tmp / PARTIAL_MARK).touch()
    return tmp


def _is_city(root):
    """Whether `root` holds one of our cities (its stamp, or an older city's train `.mat`)."""
    return (root / STAMP_NAME).is_file() or struct_path(root, DATASET_NAME, "train").is_file()


def city_files(root):
    """The files a synthetic city at `root` consists of, relative to it: its stamp, its `.mat`
    files and every image they name. These alone are ever deleted when it is replaced."""
    root = Path(root)
    files = {STAMP_NAME}
    for split in SPLITS:
        mat = struct_path(root, DATASET_NAME, split)
        if not mat.is_file():
            continue
        db = parse_db_struct(mat)
        files |= {mat.relative_to(root).as_posix(), *db.dbImage,
                  *(f"{QUERIES_DIR}/{name}" for name in db.qImage)}
    return files


def _check_replaceable(root):
    """Raise unless `root` is absent, an empty folder, or a synthetic city holding nothing else;
    return the files of the city (relative paths) to delete when it is replaced."""
    if not root.exists():
        return []
    if not root.is_dir():
        raise FileExistsError(f"{root} is a file, not a folder; choose another --out")
    if not any(root.iterdir()):
        return []
    if not _is_city(root):
        raise FileExistsError(f"{root} is not empty and is not a synthetic city (no "
                              f"{STAMP_NAME}): refusing to write into it; choose an empty or "
                              "new folder")
    try:
        ours = city_files(root)
    except ValueError as err:
        raise FileExistsError(f"{root} holds a damaged synthetic city ({err}): refusing to "
                              "replace it; delete it yourself or choose another --out") from err
    found = [p for p in root.rglob("*") if not p.is_dir() or p.is_symlink()]
    foreign = sorted(p for p in found if p.relative_to(root).as_posix() not in ours
                     or not p.is_file() or p.is_symlink())
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise FileExistsError(f"{root} is a synthetic city, but also holds {foreign[0]}{more}, "
                              "which make-synthetic did not write: refusing to replace it; "
                              "move those files out or choose another --out")
    return sorted(p.relative_to(root).as_posix() for p in found)


def _remove_named(folder, names):
    """Delete the files `names` (relative) in `folder`, then the folders left empty."""
    for name in names:
        (folder / name).unlink(missing_ok=True)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()),
                      key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _remove_leftovers(root):
    """Delete the temporary folders `.ROOTNAME.*.partial` that a killed generation left
    (those marked `PARTIAL_MARK`: a folder of that name made by someone else is kept)."""
    for leftover in root.parent.glob(f".{root.name}.*.partial"):
        if (leftover / PARTIAL_MARK).is_file() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _write_city(root, config, preset, seed, image_size):
    """Every image, then the `.mat` files, then the stamp, into `root`."""
    styles = make_styles(np.random.default_rng([seed, 0]))
    structs, place, query = [], 0, 0
    for i, split in enumerate(SPLITS, start=1):
        db = _make_split(root, split, config, image_size, np.random.default_rng([seed, i]),
                         styles, place, query)
        structs.append(db)
        fault_point("synthetic:split")
        place += db.numDb // (config.num_yaws * len(config.pitches))
        query += db.numQ
    for db in structs:
        save_db_struct(db, struct_path(root, DATASET_NAME, db.whichSet))
    atomic_json(city_stamp(preset, seed, image_size), root / STAMP_NAME)


STAMP_NAME = "synthetic_city.json"
GENERATOR_VERSION = 1  # raise it when a change to this file changes the images of a seed


def city_stamp(preset="tiny", seed=0, image_size=None):
    """What a city was generated from: generator version, preset, seed and image size.

    `make_synthetic_city` writes it to `ROOT/synthetic_city.json`; a city whose stamp differs
    (e.g. generated before the preset changed) is out of date.
    """
    config = PRESETS[preset]
    return json.loads(json.dumps({"generator": GENERATOR_VERSION, "preset": preset,
                                  "seed": seed, **asdict(config),
                                  "image_size": list(image_size or config.image_size)}))


def city_is_current(root, preset="tiny", seed=0, image_size=None):
    """True if `root` holds a complete city generated with these settings by this code."""
    stamp = Path(root) / STAMP_NAME
    try:
        return json.loads(stamp.read_text()) == city_stamp(preset, seed, image_size)
    except (OSError, ValueError):
        return False


def ensure_synthetic_city(root=None, preset="tiny", seed=0):
    """Generate the synthetic city at `root` unless it is already there; return its path.

    A city left by an older version of the course (its `synthetic_city.json` differs from what
    this code would write) is generated again, so notebook outputs match the stored ones. A
    folder that is not one of our cities is never written into (`make_synthetic_city`).
    """
    root = Path(root) if root is not None else REPO_ROOT / "data" / f"synthetic_{preset}"
    if city_is_current(root, preset, seed):
        return root
    if root.exists():
        print(f"{root} was generated by an older version of the course: generating it again")
    return make_synthetic_city(root, preset=preset, seed=seed)


def course_data_root():
    """The data root of the notebooks: `$NETVLAD_DATA_ROOT`, else the tiny synthetic city.

    The synthetic city is generated on first use, so any notebook runs in a fresh kernel.
    """
    root = default_data_root()
    if not os.environ.get(DATA_ENV):
        ensure_synthetic_city(root, preset="tiny", seed=0)
    return root


# ---------------------------------------------------------------------------------------------
# Positions only, at Pitts250k scale (no images): for memory and mining benchmarks
# ---------------------------------------------------------------------------------------------

PITTS250K_TRAIN = (91_464, 7_824)  # database images, queries
VIEWS_PER_PLACE = 24  # pitch1/pitch2 x yaw1..12, all at the place's position


def pitts_like_struct(scale=1.0, seed=0, place_spacing=10.0, block=150.0):
    """Positions shaped like Pitts250k-train: places on a street grid, 24 views per place.

    Places lie along the streets of a square grid (`block` metres apart), one per
    `place_spacing` metres on average; each query is near a random place (a few metres off).
    """
    rng = np.random.default_rng(seed)
    num_places = max(1, round(PITTS250K_TRAIN[0] * scale) // VIEWS_PER_PLACE)
    num_q = max(1, round(PITTS250K_TRAIN[1] * scale))
    num_lines = int(np.sqrt(num_places * place_spacing / (2 * block))) + 1  # per direction
    side = num_lines * block
    street = rng.integers(0, 2 * num_lines, num_places)
    along = rng.uniform(0, side, num_places)
    across = (street % num_lines) * block
    east_west = street < num_lines
    places = np.stack([np.where(east_west, along, across),
                       np.where(east_west, across, along)], axis=1) + (585_000.0, 4_477_000.0)
    utm_db = np.repeat(places, VIEWS_PER_PLACE, axis=0)
    utm_q = places[rng.integers(0, num_places, num_q)] + rng.normal(0, 3.0, (num_q, 2))
    db_names = [f"{i // VIEWS_PER_PLACE // 1000:03d}/{i // VIEWS_PER_PLACE:06d}_pitch"
                f"{i % 2 + 1}_yaw{i // 2 % 12 + 1}.jpg" for i in range(len(utm_db))]
    q_names = [f"{j // 1000:03d}/{j:06d}_pitch1_yaw1.jpg" for j in range(num_q)]
    return DbStruct("train", "pitts_like", db_names, utm_db, q_names, utm_q,
                    len(utm_db), num_q, 25, 625, 100)
