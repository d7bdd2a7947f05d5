"""Images for the demo corpus, drawn with Pillow: 1-3 shapes (circle, square, triangle) of one
colour, placed left, centre or right, with a caption and question/answer pairs whose answers
can be checked exactly."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Tuple

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
POSITIONS = ("left", "centre", "right")
NUMBERS = ("one", "two", "three")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    count: int  # 1-3 shapes, stacked vertically
    position: str  # which third of the image holds them

    def caption(self) -> str:
        plural = self.shape + ("s" if self.count > 1 else "")
        return f"{NUMBERS[self.count - 1]} {self.colour} {plural} on the {self.position}"

    def questions(self) -> List[Tuple[str, str]]:
        return [
            ("What shape is in the picture?", self.shape),
            ("What colour are the shapes?", self.colour),
            ("How many shapes are there?", NUMBERS[self.count - 1]),
            ("Where are the shapes?", self.position),
        ]


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.randint(1, 3), rng.choice(POSITIONS))


def draw(scene: Scene, size: int = 64):
    """The scene on a light grey background, as an RGB PIL image of ``size`` x ``size``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (235, 235, 235))
    pen = ImageDraw.Draw(image)
    third = size / 3
    cx = (POSITIONS.index(scene.position) + 0.5) * third
    r = third * 0.32
    step = size / scene.count
    for i in range(scene.count):
        cy = (i + 0.5) * step
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[scene.colour]
        if scene.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif scene.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image
