"""Search over a user's own image folder: one subfolder per class, PNG files inside.

    python examples/image_folder/run.py [--out runs/image_folder] [--epochs 12] [--trials 24]

For the example the folder is written from scikit-learn's bundled handwritten digits (so nothing is downloaded):
``<out>/images/<digit>/<n>.png``. With your own data, point ``task.path`` at your folder and set ``input_shape``
(channels, and the largest resolution you search) and ``num_classes``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from nas.cli import main

SPACE = """\
name: image_folder_digits
task: {{dataset: image_folder, path: {path}, input_shape: [1, 16, 16], num_classes: 10}}
stem: {{channels: 16, kernel_size: 3, stride: 1, activation: relu}}
stages:
  - depth: [1, 2]
    width: [16, 24]
    stride: 2
    blocks:
      - {{type: mbconv, kernel_size: [3, 5], expand_ratio: [2, 4], activation: relu, squeeze_excite: false}}
  - depth: [1, 2]
    width: [24, 32]
    stride: 2
    blocks:
      - {{type: mbconv, kernel_size: [3, 5], expand_ratio: [2, 4], activation: hard_swish, squeeze_excite: [false, true]}}
head: {{channels: [96], dropout: 0.1, activation: hard_swish}}
resolution: [12, 16]
training: {{epochs: {epochs}, batch_size: 128, lr: 0.006, weight_decay: 0.02}}
search: {{trials: {trials}, targets: [cpu_fp32], measure_seconds: 0.3}}
"""


def write_image_folder(folder: Path) -> int:
    """Write the 1,797 scikit-learn digits (8x8, 17 grey levels) as 16x16 PNGs, one subfolder per class."""
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=False)):
        pixels = (np.asarray(image) * (255 / 16)).round().astype(np.uint8)
        target = folder / str(label)
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").resize((16, 16), Image.Resampling.BILINEAR).save(target / f"{index}.png")
    return len(digits.images)


def run(arguments: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/image_folder"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--trials", type=int, default=24)
    args = parser.parse_args(arguments)
    images = args.out.resolve() / "images"
    if not images.is_dir():
        write_image_folder(images)
    space = args.out / "space.yaml"
    space.write_text(SPACE.format(path=images, epochs=args.epochs, trials=args.trials))
    return main(["run", str(space), "--out", str(args.out / "run"), "--no-int8"])


if __name__ == "__main__":
    raise SystemExit(run())
