"""Every registered training method, end to end: it trains an image and a sequence space, the trained supernet
equals its extracted subnets equals ONNX Runtime on 20 random archs, and a run SIGKILLed mid-phase resumes to the
same metrics as an uninterrupted one. New methods are covered by registering them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nas.export.onnx import export_onnx
from nas.space.schema import parse_config
from nas.supernets.elastic import count_parameters
from nas.supernets.strategies import STRATEGIES
from nas.supernets.supernet import build_static, resize_input
from nas.training.checkpoint import load_run
from nas.training.loop import train
from tests.helpers import TINY_DIGITS_SPACE

METHODS = sorted(STRATEGIES.names())

DIGITS = TINY_DIGITS_SPACE.replace("name: tiny", "name: methods_digits") + (
    "training: {epochs: 6, batch_size: 64, lr: 0.01, calibration_batches: 2, seed: 1, strategy: STRATEGY}\n"
)
MQAR = """\
name: methods_mqar
task: {dataset: mqar, input_shape: [24], num_classes: 32, vocab_size: 32, num_kv_pairs: 4, num_train: 128, num_val: 32, num_test: 32}
stem: {channels: 16, kernel_size: 4}
stages:
  - depth: [1, 2]
    width: [16, 24]
    blocks:
      - {type: gated_attention, num_heads: [1, 2], head_dim: [8, 16], ffn: [glu, mlp], mlp_ratio: [1, 2], activation: gelu}
      - {type: gla, num_heads: [1, 2], key_dim: [8, 16], value_dim: 16, ffn: glu, mlp_ratio: [1, 2], activation: gelu}
sequence_length: [16, 24]
training: {epochs: 6, batch_size: 32, calibration_batches: 2, seed: 1, strategy: STRATEGY}
"""


def config_text(template: str, method: str) -> str:
    return template.replace("STRATEGY", method)


@pytest.fixture(autouse=True)
def one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("template", [DIGITS, MQAR], ids=["digits", "mqar"])
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_its_subnets_equal_their_exports(method: str, template: str, tmp_path: Path) -> None:
    config = parse_config(config_text(template, method))
    result = train(config, tmp_path / "run")
    metrics = result.metrics
    assert metrics["epochs"] == 6 and len(metrics["phases"]) == 6
    history = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [record["phase"] for record in history] == metrics["phases"], "log.jsonl records the phase of every epoch"
    assert all(np.isfinite(record["loss"]) for record in history)
    if config.space.modality == "image":
        # Six epochs of tiny MQAR stay near chance for some methods; digits learn within them.
        assert metrics["largest"]["test"] > 1.5 / config.space.num_classes, "the largest subnet learned something"
    space = config.space
    loaded_config, supernet, _ = load_run(tmp_path / "run")
    assert loaded_config.training.strategy == method
    supernet.eval()
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    archs = [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(18))]
    for index, arch in enumerate(archs):
        if space.modality == "image":
            x = resize_input(torch.rand(3, 1, 8, 8, generator=generator), arch)
        else:
            x = torch.randint(0, space.in_channels, (3, arch.sequence_length), generator=generator)
        supernet.set_active(arch)
        with torch.no_grad():
            expected = supernet(x)
            static = supernet.extract(arch).eval()
            actual = static(x)
        assert (actual - expected).abs().max().item() <= 1e-5, arch.short_name()
        assert count_parameters(static) == count_parameters(build_static(space, arch)), arch.short_name()
        supernet_storage = {parameter.untyped_storage().data_ptr() for parameter in supernet.parameters()}
        assert not any(parameter.untyped_storage().data_ptr() in supernet_storage for parameter in static.parameters())
        exported = export_onnx(static, x, tmp_path / f"{index}.onnx", arch=arch, space_name=space.name, tolerance=1e-4)
        assert exported.path.is_file(), arch.short_name()  # written only once ORT agreed (matches_within_rounding)


def run_cli(*args: str, cwd: Path) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nas.cli", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_mid_phase_then_resume_gives_the_same_metrics(method: str, tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(config_text(DIGITS, method))
    reference = run_cli("train", str(space), "--out", "reference", cwd=tmp_path)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    phases = expected["phases"]
    killed = run_cli("train", str(space), "--out", "killed", cwd=tmp_path)
    log = tmp_path / "killed" / "log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    completed = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["epochs_completed"]
    assert 3 <= completed < 6, "the kill must land mid-training"
    resumed = run_cli("train", str(space), "--out", "killed", "--resume", cwd=tmp_path)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    actual = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    expected.pop("train_seconds")
    actual.pop("train_seconds")
    assert actual == expected, f"{method}: killed after epoch {completed} (phase {phases[completed - 1]}) and resumed"
