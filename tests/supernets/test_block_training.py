"""Every image block family trains: a two-block-per-stage net of one family (its largest subnet in the built-in
``vision_hybrid`` space) brings the digits training loss well below chance within a few dozen steps. A block whose
stacks start far from the identity (multiplicative mixers without a residual scale) stays at chance; this catches it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.datasets import load_digits

from nas.space.schema import builtin_spaces, parse_config
from nas.supernets.blocks import BLOCKS
from nas.supernets.supernet import Supernet

SPACE_FILE = builtin_spaces()["vision_hybrid"]
IMAGE_FAMILIES = [name for name, entry in BLOCKS.items() if "image" in entry.modalities]


def test_vision_hybrid_lists_every_image_family() -> None:
    data = yaml.safe_load(SPACE_FILE.read_text())
    for stage in data["stages"]:
        assert sorted(block["type"] for block in stage["blocks"]) == sorted(IMAGE_FAMILIES)


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_a_stack_of_each_image_family_learns(family: str) -> None:
    data = yaml.safe_load(SPACE_FILE.read_text())
    for stage in data["stages"]:
        stage["blocks"] = [block for block in stage["blocks"] if block["type"] == family]
    space = parse_config(yaml.safe_dump(data)).space
    torch.manual_seed(0)
    supernet = Supernet(space)
    arch = space.largest()
    assert all(len(stage.blocks) == 2 for stage in arch.stages)
    supernet.set_active(arch)
    supernet.train()
    digits = load_digits()
    images = F.interpolate(torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0, size=arch.resolution, mode="bilinear")
    labels = torch.tensor(digits.target)
    optimizer = torch.optim.AdamW(supernet.parameters(), lr=0.004, weight_decay=0.02)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        batch = torch.randint(0, len(images), (64,), generator=generator)
        loss = F.cross_entropy(supernet(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * math.log(10), (family, [round(value, 2) for value in losses[::5]])
