"""Drawn scenes hold what their captions and answers say: the colour, the number of separate
shapes, their third of the image, and a shape told apart by how much of its box it fills."""

import random

import numpy as np
import pytest
from scipy import ndimage

from omnifast.demo import COLOURS, POSITIONS, Scene, draw, random_scene

SCENES = [
    Scene(s, c, n, p)
    for s in ("circle", "square", "triangle")
    for c in ("red", "blue")
    for n in (1, 3)
    for p in POSITIONS
]


@pytest.mark.parametrize("scene", SCENES, ids=str)
def test_the_picture_matches_the_scene(scene):
    pixels = np.asarray(draw(scene, 96)).astype(int)
    mask = np.abs(pixels - np.array(COLOURS[scene.colour])).sum(-1) < 30
    labels, count = ndimage.label(mask)
    assert count == scene.count
    columns = np.nonzero(mask.any(0))[0]
    assert POSITIONS[int(columns.mean() // 32)] == scene.position
    first = labels == 1
    rows, cols = np.nonzero(first)
    fill = first.sum() / ((np.ptp(rows) + 1) * (np.ptp(cols) + 1))
    expected = {"square": (0.95, 1.01), "circle": (0.7, 0.85), "triangle": (0.4, 0.6)}[scene.shape]
    assert expected[0] <= fill <= expected[1], fill


def test_captions_and_questions():
    scene = Scene("triangle", "green", 2, "left")
    assert scene.caption() == "two green triangles on the left"
    assert dict(scene.questions())["How many shapes are there?"] == "two"
    rng = random.Random(0)
    assert len({random_scene(rng) for _ in range(200)}) > 50
