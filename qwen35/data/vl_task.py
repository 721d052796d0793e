"""The built-in image task: PIL-drawn scenes with answers a program can check.

Each image is a 64x64 canvas holding one to three shapes (circle, square or triangle) of one
colour on a grey background; the question asks either their colour (one of four) or how many
there are (one to three). A tiny vision-language model trained from scratch on a CPU learns the
colour within minutes and the count more slowly, so held-out accuracy says plainly whether the
image reached the language model. Chance is 1/4 for colour and 1/3 for the count.

Records are written in the OpenAI content-part form with image paths relative to the data file,
exactly what a user's data looks like. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
COUNTS = ("one", "two", "three")
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour are the shapes?", "count": "How many shapes are there?"}
SIZE = 64


@dataclass(frozen=True)
class Scene:
    image: str  # file name, relative to the data file
    kind: str  # "colour" or "count"
    answer: str

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(COLOURS) if self.kind == "colour" else COUNTS


@dataclass(frozen=True)
class ImageTaskFiles:
    train: Path
    val: Path


def draw_scene(rng: random.Random) -> tuple[Image.Image, str, int]:
    """An image, its colour name and its shape count."""
    colour = rng.choice(list(COLOURS))
    count = rng.randint(1, len(COUNTS))
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    cells = rng.sample([(x, y) for x in range(2) for y in range(2)], count)  # one shape per quadrant
    for cx, cy in cells:
        r = rng.randint(7, 12)
        x = cx * SIZE // 2 + rng.randint(r, SIZE // 2 - r)
        y = cy * SIZE // 2 + rng.randint(r, SIZE // 2 - r)
        shape = rng.choice(SHAPES)
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
    return image, colour, count


def record(scene: Scene) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": scene.image},
                                     {"type": "text", "text": QUESTIONS[scene.kind]}]},
        {"role": "assistant", "content": scene.answer},
    ]}


def build_image_task(directory: str | Path, n_train: int = 2000, n_val: int = 200, seed: int = 0) -> ImageTaskFiles:
    """Writes `images/*.png`, `train.jsonl` and `val.jsonl` under `directory` (once: an existing
    complete set is reused)."""
    directory = Path(directory)
    files = ImageTaskFiles(directory / "train.jsonl", directory / "val.jsonl")
    if files.train.is_file() and files.val.is_file():
        return files
    (directory / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for path, n, offset in ((files.val, n_val, 0), (files.train, n_train, n_val)):
        lines = []
        for i in range(offset, offset + n):
            image, colour, count = draw_scene(rng)
            name = f"images/{i:05d}.png"
            image.save(directory / name)
            kind = rng.choice(list(QUESTIONS))
            lines.append(json.dumps(record(Scene(name, kind, colour if kind == "colour" else COUNTS[count - 1]))))
        partial = path.with_suffix(".partial")
        partial.write_text("\n".join(lines) + "\n")
        partial.rename(path)
    return files


def load_scenes(path: Path) -> list[Scene]:
    scenes = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        image, question = messages[0]["content"]
        kind = next(k for k, q in QUESTIONS.items() if q == question["text"])
        scenes.append(Scene(image["image"], kind, messages[1]["content"]))
    return scenes
