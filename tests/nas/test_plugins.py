"""User plugins: a block written in a temporary file goes validate -> train -> export with no nasforge file touched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import randomise_batch_norm

from nas.export.onnx import export_onnx
from nas.plugins import PluginError, load_plugin
from nas.space.schema import ConfigError, load_config
from nas.supernets.blocks import BLOCKS
from nas.supernets.supernet import Supernet

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_block"

PLUGIN_BLOCK = """
from dataclasses import dataclass

import torch
from torch import nn

from nas.supernets.blocks import BlockChoices, BlockContext, ElasticBlock, IntRule, choice, register_block
from nas.supernets.elastic import ElasticBatchNorm2d, ElasticConv2d


@dataclass(frozen=True, slots=True)
class DepthwiseResidualConfig:
    kernel_size: int = choice(IntRule(1, 9, odd=True), "depthwise kernel")


class DepthwiseResidual(nn.Module):
    def __init__(self, config, context):
        super().__init__()
        channels = context.out_channels
        self.conv = nn.Conv2d(channels, channels, config.kernel_size, padding=config.kernel_size // 2, groups=channels, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + torch.relu(self.norm(self.conv(x)))


@register_block("test_depthwise_residual", config=DepthwiseResidualConfig, static=DepthwiseResidual, modalities=("image",), reshapes=False)
class ElasticDepthwiseResidual(ElasticBlock):
    def __init__(self, context: BlockContext, choices: BlockChoices) -> None:
        super().__init__(context, choices)
        self.conv = ElasticConv2d(context.out_channels, context.out_channels, choices["kernel_size"], depthwise=True)
        self.norm = ElasticBatchNorm2d(context.out_channels)

    def forward(self, x):
        channels = self.out_channels
        return x + torch.relu(self.norm(self.conv(x, channels, channels, self.config.kernel_size), channels))

    def extract(self):
        channels = self.out_channels
        return self.build_static({"conv": self.conv.export(channels, channels, self.config.kernel_size), "norm": self.norm.export(channels)})
"""

SPACE = """\
name: plugin_space
plugins: [{plugin}]
task: {{dataset: digits, input_shape: [1, 8, 8], num_classes: 10}}
stem: {{channels: 8, kernel_size: 3, stride: 1, activation: relu}}
stages:
  - depth: [1, 2]
    width: [8, 12]
    stride: 2
    blocks:
      - {{type: test_depthwise_residual, kernel_size: [3, 5]}}
      - {{type: mbconv, kernel_size: 3, expand_ratio: 2, activation: relu, squeeze_excite: false}}
head: {{channels: [16]}}
resolution: [6, 8]
training: {{epochs: 1, batch_size: 64, random_subnets: 1}}
"""


def nas(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def plugin_space(tmp_path: Path) -> Path:
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "my_block.py").write_text(PLUGIN_BLOCK)
    (folder / "space.yaml").write_text(SPACE.format(plugin="my_block.py"))
    return folder / "space.yaml"


def test_a_plugin_block_validates_trains_and_exports_from_another_folder(plugin_space: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    validated = nas("validate", plugin_space, cwd=elsewhere)
    assert validated.returncode == 0, validated.stderr
    assert f"importing plugin file {plugin_space.parent / 'my_block.py'}" in validated.stderr
    run = tmp_path / "run"
    trained = nas("train", plugin_space, "--out", run, cwd=elsewhere)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((run / "metrics.json").read_text())["largest"]["val"] > 0.1
    arch = {
        "resolution": 8,
        "sequence_length": None,
        "stages": [
            {
                "width": 12,
                "blocks": [
                    {"type": "test_depthwise_residual", "kernel_size": 5},
                    {"type": "mbconv", "kernel_size": 3, "expand_ratio": 2, "activation": "relu", "squeeze_excite": False},
                ],
            }
        ],
    }
    exported = nas("export", run, "--arch", json.dumps(arch), "--out", tmp_path / "export", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    summary = json.loads((tmp_path / "export" / "export.json").read_text())
    assert summary["arch"] == arch or json.loads(json.dumps(summary["arch"])) == arch


def test_plugin_block_contract_elastic_equals_extracted_equals_onnx(plugin_space: Path, tmp_path: Path) -> None:
    config = load_config(plugin_space)
    assert "test_depthwise_residual" in BLOCKS
    supernet = Supernet(config.space)
    randomise_batch_norm(supernet)
    supernet.eval()
    rng = np.random.default_rng(0)
    inputs = torch.randn(3, 1, 8, 8)
    for _ in range(5):
        arch = config.space.sample(rng)
        supernet.set_active(arch)
        with torch.no_grad():
            elastic = supernet(inputs[..., : arch.resolution, : arch.resolution])
            static = supernet.extract(arch).eval()
            extracted = static(inputs[..., : arch.resolution, : arch.resolution])
        assert torch.allclose(elastic, extracted, atol=1e-5)
        example = inputs[..., : arch.resolution, : arch.resolution]
        result = export_onnx(static, example[:1], tmp_path / "model.onnx", arch=arch, space_name=config.space.name, check_inputs=example, tolerance=1e-4)
        assert result.max_abs_error <= 1e-4


def test_the_example_plugin_space_validates() -> None:
    config = load_config(EXAMPLE / "space.yaml")
    assert {"conv_mixer", "mbconv"} <= {choices.type for stage in config.space.stages for choices in stage.blocks}


def test_a_missing_plugin_is_a_clear_problem_with_its_place(tmp_path: Path) -> None:
    (tmp_path / "space.yaml").write_text(SPACE.format(plugin="nowhere.py"))
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "space.yaml")
    paths = [problem.path for problem in caught.value.problems]
    assert "plugins[0]" in paths
    assert f"no such plugin file: {tmp_path / 'nowhere.py'}" in str(caught.value)
    assert any("test_depthwise_residual" in str(problem) for problem in caught.value.problems) or "test_depthwise_residual" in BLOCKS


def test_a_plugin_that_raises_is_reported_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "space.yaml").write_text(SPACE.format(plugin="broken.py"))
    result = nas("validate", tmp_path / "space.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "plugins[0]: importing plugin 'broken.py' failed: RuntimeError: boom" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_plugin_that_registers_a_taken_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / "clash.py").write_text("from nas.supernets.blocks import BLOCKS\nBLOCKS.register('mbconv', object())\n")
    with pytest.raises(PluginError, match="block type 'mbconv' is already registered"):
        load_plugin(str(tmp_path / "clash.py"))


def test_a_module_plugin_and_an_unknown_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (EXAMPLE / "conv_mixer.py").read_text().replace('"conv_mixer"', '"conv_mixer_from_module"')
    (tmp_path / "user_conv_mixer_module.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugin("user_conv_mixer_module")
    assert "conv_mixer_from_module" in BLOCKS
    assert load_plugin("user_conv_mixer_module") is load_plugin("user_conv_mixer_module")
    with pytest.raises(PluginError, match="no plugin file, entry point"):
        load_plugin("no_such_plugin_module_anywhere")
