"""Search over a user's own arrays in a NumPy ``.npz`` file (``x_train``, ``y_train`` and optionally ``x_val``,
``y_val``, ``x_test``, ``y_test``; images ``[N, H, W]``, ``[N, C, H, W]`` or ``[N, H, W, C]``, integer labels).

    python examples/npz_arrays/run.py [--out runs/npz_arrays] [--epochs 12] [--trials 24]

For the example the archive is written from scikit-learn's bundled digits, with its own test split; validation is
carved out of the training arrays (``val_fraction``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from nas.cli import main

SPACE = """\
name: npz_digits
task: {{dataset: npz, path: {path}, input_shape: [1, 8, 8], num_classes: 10, val_fraction: 0.15}}
stem: {{channels: 16, kernel_size: 3, stride: 1, activation: relu}}
stages:
  - depth: [1, 2]
    width: [16, 24]
    stride: 1
    blocks:
      - {{type: mbconv, kernel_size: [3, 5], expand_ratio: [2, 4], activation: relu, squeeze_excite: false}}
  - depth: [1, 2]
    width: [24, 32]
    stride: 2
    blocks:
      - {{type: mbconv, kernel_size: [3, 5], expand_ratio: [2, 4], activation: hard_swish, squeeze_excite: [false, true]}}
head: {{channels: [64], dropout: 0.1, activation: hard_swish}}
resolution: [6, 8]
training: {{epochs: {epochs}, batch_size: 128, lr: 0.006, weight_decay: 0.02}}
search: {{trials: {trials}, targets: [cpu_fp32], measure_seconds: 0.3}}
"""


def write_arrays(path: Path, seed: int = 0) -> None:
    """The digits as uint8 ``[N, 8, 8]`` arrays, 20% held out as the test split."""
    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, x_train=images[train], y_train=digits.target[train], x_test=images[test], y_test=digits.target[test])


def run(arguments: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/npz_arrays"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--trials", type=int, default=24)
    args = parser.parse_args(arguments)
    arrays = args.out.resolve() / "digits.npz"
    if not arrays.is_file():
        write_arrays(arrays)
    space = args.out / "space.yaml"
    space.write_text(SPACE.format(path=arrays, epochs=args.epochs, trials=args.trials))
    return main(["run", str(space), "--out", str(args.out / "run"), "--no-int8"])


if __name__ == "__main__":
    raise SystemExit(run())
