"""Mixture-of-Supernets (``training.strategy: mixture``): supernet == extracted == ONNX Runtime with the router's
mixture baked in, arch-dependent weights at equal widths, gradients through the router, one expert == the plain
supernet, options validated with their YAML path, and a trained run that reloads and repeats."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nas.export.onnx import export_onnx
from nas.space.schema import ConfigError, parse_config
from nas.supernets.elastic import count_parameters
from nas.supernets.space import Arch, SearchSpace
from nas.supernets.strategies import STRATEGIES, Schedule
from nas.supernets.strategies.mixture import MixtureConv2d, MixtureLinear, MixtureOfSupernets, MixtureOptions, MixtureSupernet
from nas.supernets.supernet import Supernet, build_static
from nas.training.checkpoint import load_run
from nas.training.loop import final_metrics, make_optimizer, train, train_step
from tests.helpers import TINY_DIGITS_SPACE, randomise_batch_norm
from tests.supernets.test_strategies import MIXED_SPACE

SPACES = {"digits": TINY_DIGITS_SPACE, "mixed": MIXED_SPACE}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def space_of(name: str) -> SearchSpace:
    return parse_config(SPACES[name]).space


def example(space: SearchSpace, arch: Arch, batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if space.modality == "image":
        assert arch.resolution is not None
        return torch.randn(batch, space.in_channels, arch.resolution, arch.resolution, generator=generator)
    assert arch.sequence_length is not None
    return torch.randint(0, space.in_channels, (batch, arch.sequence_length), generator=generator)


def perturbed(supernet: MixtureSupernet, seed: int = 0) -> MixtureSupernet:
    """``supernet`` with random router weights (so the mixtures differ between archs and from uniform), the experts
    beyond the first set well apart, and random batch norm statistics; in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in supernet.named_parameters():
            if "router" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
            elif ".mixture." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    randomise_batch_norm(supernet, seed)
    return supernet.eval()


def storage(module: torch.nn.Module) -> set[int]:
    return {tensor.data_ptr() for tensor in module.state_dict().values()}


def onnx_runtime_output(static: torch.nn.Module, x: torch.Tensor, path: Path) -> np.ndarray:
    """``static`` exported to ONNX (TorchScript exporter, opset 17, as ``nas.export.onnx``) and run by ONNX Runtime
    on one CPU thread."""
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(static, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("routing", ["layerwise", "neuronwise"])
@pytest.mark.parametrize("space_name", ["digits", "mixed"])
def test_supernet_equals_extracted_equals_onnx_runtime(space_name: str, routing: str, tmp_path: Path) -> None:
    """For the largest, the smallest and 18 random archs: supernet (eval) == extracted static module <= 1e-5,
    parameter counts and names of ``build_static``, no shared storage; ONNX Runtime == supernet <= 1e-4 for half of
    them (the other half under the other routing: 20 archs per space). The largest also goes through the project's
    export path (``export_onnx``: checker, another batch size, metadata)."""
    space = space_of(space_name)
    torch.manual_seed(0)
    supernet = perturbed(MixtureSupernet(space, experts=3, routing=routing))
    kinds = {type(layer) for layer in supernet.mixture_layers}
    assert kinds == ({MixtureLinear, MixtureConv2d} if space.modality == "image" else {MixtureLinear})
    rng = np.random.default_rng(1)
    archs = [space.largest(), space.smallest(), *(space.sample(rng) for _ in range(18))]
    for index, arch in enumerate(archs):
        supernet.set_active(arch)
        x = example(space, arch, 3, seed=index)
        static = supernet.extract().eval()
        with torch.no_grad():
            expected = supernet(x)
            extracted = static(x)
        assert (expected - extracted).abs().max().item() <= 1e-5, arch.short_name()
        fresh = build_static(space, arch)
        assert count_parameters(static) == count_parameters(fresh)
        assert static.state_dict().keys() == fresh.state_dict().keys()
        assert not storage(static) & storage(supernet)
        if index % 2 == (routing == "neuronwise"):
            assert np.abs(onnx_runtime_output(static, x, tmp_path / f"{index}.onnx") - expected.numpy()).max() <= 1e-4, arch.short_name()
        if index == 0:
            result = export_onnx(static, x, tmp_path / "largest.onnx", arch=arch, space_name=space.name, check_inputs=example(space, arch, 2, 99))
            assert result.max_abs_error <= 1e-4


def test_archs_with_equal_widths_get_different_weights() -> None:
    space = space_of("digits")
    torch.manual_seed(0)
    for routing in ("layerwise", "neuronwise"):
        supernet = perturbed(MixtureSupernet(space, experts=2, routing=routing))
        first = space.largest()
        second = Arch(first.stages, resolution=min(space.resolutions))
        assert first != second and [stage.width for stage in first.stages] == [stage.width for stage in second.stages]
        statics = {}
        for arch in (first, second):
            supernet.set_active(arch)
            statics[arch] = supernet.extract().eval()
            x = example(space, arch, 4)
            with torch.no_grad():
                assert (supernet(x) - statics[arch](x)).abs().max().item() <= 1e-5
        one, two = (dict(statics[arch].named_parameters()) for arch in (first, second))
        assert one.keys() == two.keys()
        assert not torch.equal(one["head.classifier.weight"], two["head.classifier.weight"])
        assert not torch.equal(one["stages.0.0.project.0.weight"], two["stages.0.0.project.0.weight"])
        mixing = supernet.mixing_weights(first)
        assert not torch.allclose(mixing["classifier"], supernet.mixing_weights(second)["classifier"])
        assert all(torch.allclose(alpha.sum(-1), torch.ones(())) for alpha in mixing.values())


def test_the_weight_cache_follows_the_arch_and_the_router() -> None:
    space = space_of("digits")
    torch.manual_seed(0)
    supernet = perturbed(MixtureSupernet(space, experts=2))
    first = space.largest()
    second = Arch(first.stages, resolution=min(space.resolutions))
    x = example(space, first, 2)
    with torch.no_grad():
        supernet.set_active(first)
        before = supernet(x)
        supernet.set_active(second)
        supernet(torch.nn.functional.interpolate(x, size=(6, 6)))
        supernet.set_active(first)
        assert torch.equal(supernet(x), before)
        head = supernet.router
        assert head is not None
        head[0].bias.add_(1.0)
        changed = supernet(x)
    assert not torch.equal(changed, before)
    fresh = copy.deepcopy(supernet)
    with torch.no_grad():
        assert torch.equal(fresh(x), changed)


def test_one_expert_is_the_plain_supernet() -> None:
    for space_name in ("digits", "mixed"):
        space = space_of(space_name)
        torch.manual_seed(0)
        plain = Supernet(space)
        with torch.no_grad():
            for parameter in plain.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        randomise_batch_norm(plain)
        mixture = MixtureSupernet(space, experts=1)
        assert mixture.router is None and mixture.state_dict().keys() == plain.state_dict().keys()
        mixture.load_state_dict(plain.state_dict())
        plain.eval()
        mixture.eval()
        rng = np.random.default_rng(0)
        for index in range(5):
            arch = space.sample(rng)
            plain.set_active(arch)
            mixture.set_active(arch)
            x = example(space, arch, 3, seed=index)
            with torch.no_grad():
                assert torch.equal(plain(x), mixture(x))
            plain.train()
            mixture.train()
            assert torch.equal(plain(x), mixture(x)), "equal in training mode, with gradients, too"
            plain.eval()
            mixture.eval()


def test_experts_that_start_equal_give_the_plain_supernet_for_any_routing() -> None:
    space = space_of("digits")
    torch.manual_seed(0)
    plain = Supernet(space)
    mixture = perturbed(MixtureSupernet(space, experts=3, routing="neuronwise"))
    shared = plain.state_dict()
    with torch.no_grad():
        for name, tensor in mixture.state_dict().items():
            for marker, suffix in (("mixture.weights.", "weight"), ("mixture.biases.", "bias")):
                if marker in name:
                    tensor.copy_(shared[name.split(marker)[0] + suffix])
            if name in shared:
                tensor.copy_(shared[name])
    plain.eval()
    arch = space.sample(np.random.default_rng(3))
    plain.set_active(arch)
    mixture.set_active(arch)
    x = example(space, arch, 3)
    with torch.no_grad():
        assert (plain(x) - mixture(x)).abs().max().item() <= 1e-6


def strategy(space: SearchSpace, **options: Any) -> MixtureOfSupernets:
    return MixtureOfSupernets(space, MixtureOptions(**options), Schedule(lr=0.01, epochs=2, warmup_epochs=0, steps_per_epoch=8))


@pytest.mark.parametrize("routing", ["layerwise", "neuronwise"])
def test_the_router_learns_in_a_training_step_and_the_loss_falls(routing: str) -> None:
    space = space_of("digits")
    rule = strategy(space, routing=routing, random_subnets=1)
    torch.manual_seed(0)
    supernet = rule.build_supernet(space, rule.options)
    assert isinstance(supernet, MixtureSupernet)
    config = parse_config(TINY_DIGITS_SPACE + "training: {strategy: mixture, weight_decay: 0}\n")
    optimizer = make_optimizer(supernet, config.training)
    inputs = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    phase = rule.phase(0)
    rng = np.random.default_rng(0)
    router = {name: parameter for name, parameter in supernet.named_parameters() if "router" in name}
    heads = [name for name in router if "router_head" in name]
    assert heads and len(router) == len(heads) + 2
    initial = {name: parameter.detach().clone() for name, parameter in router.items()}
    supernet.train()
    losses = []
    for step in range(12):
        tasks = rule.tasks(phase, rng, 0, step)
        assert len(tasks) == 3 and tasks[0].arch == space.largest() and tasks[0].provides_teacher
        losses.append(train_step(supernet, tasks, inputs, targets, optimizer=optimizer, lr=0.01)[0])
        if step == 0:
            assert all(router[name].grad is not None and router[name].grad.abs().sum() > 0 for name in heads)
        if step == 1:
            trunk = [name for name in router if name not in heads]
            assert all(router[name].grad is not None and router[name].grad.abs().sum() > 0 for name in trunk)
    assert all(not torch.equal(router[name].detach(), initial[name]) for name in router)
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_frozen_copy_and_a_state_dict_round_trip_keep_the_function() -> None:
    space = space_of("mixed")
    torch.manual_seed(0)
    supernet = perturbed(MixtureSupernet(space, experts=2, routing="neuronwise"))
    frozen = copy.deepcopy(supernet)
    torch.manual_seed(5)
    rebuilt = MixtureSupernet(space, experts=2, routing="neuronwise").eval()
    rebuilt.load_state_dict(supernet.state_dict())
    arch = space.sample(np.random.default_rng(4))
    x = example(space, arch, 2)
    outputs = []
    for network in (supernet, frozen, rebuilt):
        network.set_active(arch)
        with torch.no_grad():
            outputs.append(network(x))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert not storage(frozen) & storage(supernet)
    assert any(layer is frozen.classifier for layer in frozen.mixture_layers)
    assert not any(layer is supernet.classifier for layer in frozen.mixture_layers)


def test_permuting_a_layer_permutes_every_expert_and_its_router_rows() -> None:
    space = space_of("mixed")
    torch.manual_seed(0)
    supernet = perturbed(MixtureSupernet(space, experts=3, routing="neuronwise"))
    block = supernet.stages[0].positions[0]["gated_attention"]
    ffn = block.ffn
    arch = space.largest("gated_attention")
    supernet.set_active(arch)
    x = example(space, arch, 2)
    with torch.no_grad():
        before = supernet(x)
        order = torch.randperm(ffn.up.weight.shape[0])
        for layer in (ffn.up, ffn.gate):
            layer.permute_(out_order=order)
        ffn.down.permute_(in_order=order)
        after = supernet(x)
    assert (before - after).abs().max().item() <= 1e-5


def options_problems(training: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(TINY_DIGITS_SPACE + f"training: {training}\n", "space.yaml")
    return {problem.path: problem.message for problem in caught.value.problems}


def test_options_are_validated_with_their_yaml_path() -> None:
    assert "mixture" in STRATEGIES.names()
    problems = options_problems("{strategy: mixture, experts: 0}")
    assert set(problems) == {"training.experts"} and "greater than or equal to 1" in problems["training.experts"]
    assert "training.experts" in options_problems("{strategy: mixture, experts: 17}")
    assert "training.experts" in options_problems("{strategy: mixture, experts: 2.5}")
    assert "training.routing" in options_problems("{strategy: mixture, routing: tokenwise}")
    assert "training.router_hidden" in options_problems("{strategy: mixture, router_hidden: 0}")
    problems = options_problems("{strategy: mixture, expert: 2}")
    assert "unknown key for strategy 'mixture'" in problems["training.expert"] and "did you mean 'experts'?" in problems["training.expert"]
    assert "it is an option of ['mixture']" in options_problems("{experts: 2}")["training.experts"]
    config = parse_config(TINY_DIGITS_SPACE + "training: {strategy: mixture, experts: 4, routing: neuronwise, router_hidden: 8, random_subnets: 1}\n")
    options = config.training.strategy_options()
    assert options == MixtureOptions(experts=4, routing="neuronwise", router_hidden=8, random_subnets=1)
    assert MixtureOptions() == MixtureOptions(experts=2, routing="layerwise", router_hidden=32, random_subnets=2, distill=True, largest_only_epochs=0)
    supernet = MixtureOfSupernets.build_supernet(config.space, options)
    assert isinstance(supernet, MixtureSupernet) and (supernet.experts, supernet.routing, supernet.router_hidden) == (4, "neuronwise", 8)


RUN_SPACE = TINY_DIGITS_SPACE.replace("name: tiny", "name: tiny_mixture") + (
    "training: {strategy: mixture, experts: 2, routing: neuronwise, router_hidden: 8, epochs: 2, batch_size: 64, lr: 0.01, random_subnets: 1, "
    "calibration_batches: 2, seed: 3}\n"
)


def without_time(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metrics.items() if key != "train_seconds"}


def test_a_trained_run_reloads_to_the_same_outputs_and_repeats_for_its_seed(tmp_path: Path) -> None:
    from nas.data.tasks import load_task_data

    config = parse_config(RUN_SPACE, "mixture.yaml")
    task_data = load_task_data(config.task, config.space, seed=config.training.seed)
    train_split = dataclasses.replace(task_data.train, inputs=task_data.train.inputs[:384], targets=task_data.train.targets[:384])
    task_data = dataclasses.replace(task_data, train=train_split)
    first = train(config, tmp_path / "first", task_data=task_data)
    second = train(config, tmp_path / "second", task_data=task_data)
    assert without_time(first.metrics) == without_time(second.metrics)
    assert first.metrics["phases"] == ["sandwich", "sandwich"]
    weights = load_file(str(tmp_path / "first" / "checkpoint" / "weights.safetensors"))
    repeated = load_file(str(tmp_path / "second" / "checkpoint" / "weights.safetensors"))
    assert weights.keys() == repeated.keys() and all(torch.equal(weights[name], repeated[name]) for name in weights)
    assert any("router_head" in name for name in weights) and any(".mixture.weights.0" in name for name in weights)
    _, supernet, state = load_run(tmp_path / "first")
    _, again, _ = load_run(tmp_path / "first")
    assert isinstance(supernet, MixtureSupernet) and state["epochs_completed"] == 2
    arch = config.space.sample(np.random.default_rng(0))
    x = example(config.space, arch, 4)
    outputs = []
    for network in (supernet, again):
        network.eval()
        network.set_active(arch)
        with torch.no_grad():
            outputs.append(network(x))
    assert torch.equal(outputs[0], outputs[1])
    static = supernet.extract(arch).eval()
    with torch.no_grad():
        assert (static(x) - outputs[0]).abs().max().item() <= 1e-5
    reloaded = final_metrics(supernet, config, task_data)
    assert reloaded == {key: first.metrics[key] for key in reloaded}
