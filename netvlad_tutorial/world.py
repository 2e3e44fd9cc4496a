"""Stage 2 (before the network): a synthetic world of labelled street views, for pretraining.

The paper starts from VGG16 trained on ImageNet: another task (1000-way classification) on
other images. This course cannot download those weights, so it makes its stand-in the same way:
street views of a *world* that shares no building, street or capture with any city, labelled
with what the generator knows, the facade style the camera faces and the sky above it.
No positions, no positives, no triplets: a classification task, as ImageNet's is.

Apart from every city: each random stream of the world is `np.random.default_rng([WORLD_TAG,
seed, ...])`, while a city draws from `[seed, i]` with its seed below 10,000, so no stream is
shared; the world has its own library of `NUM_STYLES` facade styles (a test checks that none
equals a style of any city seed below 10,000).
"""

import numpy as np
from PIL import ImageOps

from .synthetic import (
    CAMERA_HEIGHT,
    SKIES,
    Camera,
    Look,
    _jitter,
    _make_street,
    degrade,
    make_styles,
    render,
)

WORLD_TAG = 7_057_078  # first word of every world stream; city seeds are below 10,000
NUM_STYLES = 64  # facade styles of the world: the classes of the pretraining task
SKY_NAMES = tuple(SKIES)  # the second task: which sky ("clear", "overcast", "dusk", "haze")
STREET_LENGTH = 100.0  # metres of street between the camera's first and last position
SIDES = (90.0, -90.0)  # headings facing the left (+y) and the right (-y) facade row


def world_rng(seed, *keys):
    """The world's random stream for `keys` (e.g. `(1, street_index)`)."""
    return np.random.default_rng([WORLD_TAG, seed, *keys])


def world_styles(seed=0):
    """The world's library of `NUM_STYLES` facade styles."""
    return make_styles(world_rng(seed, 0), NUM_STYLES)


def facade_ppm(image_size):
    """Facade texels per metre for views of `image_size`, as the city uses (2x supersampling)."""
    return float(np.clip(round(image_size[1] * 2 / 18), 16, 40))


def world_street(seed, index, styles, ppm):
    """Street `index` of the world: one style along each side. Returns (street, (left, right)).

    Every building of a row has the same style, so the style a camera faces is a clean label.
    """
    rng = world_rng(seed, 1, index)
    left, right = (int(i) for i in rng.choice(len(styles), 2, replace=False))
    street = _make_street(rng, [styles[left]], np.zeros(2), np.array([1.0, 0.0]),
                          STREET_LENGTH, ppm, right_styles=[styles[right]])
    return street, (left, right)


def world_view(street, labels, rng, image_size):
    """One labelled view: (image as uint8 (H, W, 3), style label, sky label).

    The camera faces one facade row (within 45 degrees), at a person's or a car's height, with
    another lens, sky, light and haze each time; most views get a query's degradations
    (occluders, blur, exposure, noise), and half are mirrored.
    """
    side = int(rng.integers(2))
    cam = Camera(x=float(rng.uniform(10, STREET_LENGTH - 10)), y=float(rng.uniform(-3, 3)),
                 z=float(rng.uniform(1.6, CAMERA_HEIGHT + 0.5)),
                 heading=SIDES[side] + float(rng.uniform(-45, 45)),
                 pitch=float(rng.uniform(0, 15)), fov=float(rng.uniform(50, 70)))
    sky = int(rng.integers(len(SKY_NAMES)))
    top, horizon = SKIES[SKY_NAMES[sky]]
    look = Look(_jitter(rng, top, 15), _jitter(rng, horizon, 15), float(rng.uniform(40, 90)),
                tuple(float(v) for v in rng.uniform(0.6, 1.15, 3)))
    image = render(street, cam, look, image_size)
    if rng.random() < 0.7:
        image = degrade(image, rng)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return np.asarray(image), labels[side], sky


def world_batch(seed, key, streets, image_size, batch_size):
    """`batch_size` views of random `streets`, drawn from the stream `(2, *key)`.

    Args:
        key: a tuple naming the batch (e.g. `(step,)`): the same key, the same batch.
        streets: list of `world_street` results.

    Returns:
        images (B, H, W, 3) uint8 and labels (B, 2) int64: style, sky.
    """
    rng = world_rng(seed, 2, *key)
    images = np.empty((batch_size, *image_size, 3), np.uint8)
    labels = np.empty((batch_size, 2), np.int64)
    for i in range(batch_size):
        street, sides = streets[int(rng.integers(len(streets)))]
        images[i], labels[i, 0], labels[i, 1] = world_view(street, sides, rng, image_size)
    return images, labels
