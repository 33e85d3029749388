"""Every member of a SortedNet run's family out as checked ONNX files, with one table that compares them.

``export_sorted(run_dir)`` takes a run trained with the ``sorted`` strategy (``nas.supernets.strategies.sorted``) and
writes into ``RUN/sorted/`` (or ``out``):

```
sorted/
  m00_<arch>/ .. m<K-1>_<arch>/   one export folder per member, smallest first (model.onnx [+ model.int8.onnx],
                                  arch.yaml, weights.safetensors, export.json: ``export_loaded``, parity-checked)
  sorted.json                     per member: t, arch, parameters, MACs, inherited and ONNX accuracies, fp32 CPU
                                  latency, the share of the largest member's accuracy it keeps; the family means
  report.md                       the same as a table, with how latency was measured
```

Inherited accuracies are the search's evaluation (``evaluate_arch``: the run's BN calibration batches, then the
supernet with the member active); ONNX accuracies are those of the written ``model.onnx`` (``onnx_accuracy``). The
shares are of ONNX test accuracy, the number of the file that ships. Latency is the members' ``model.onnx`` on
``cpu_fp32``, all measured interleaved in one ``measure_latency`` call with the run's ``search`` settings (threads,
batch size, ``measure_seconds`` per member).

The whole folder is written beside its target and renamed into place (``nas.durable.replace_folder``), so a killed
or failed export leaves the previous one as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from nas import durable, jsonio
from nas.export.subnet import ExportReport, export_loaded, load_export_context
from nas.run_dir import CONFIG_FILE, RunDir
from nas.run_lock import locks_run_dir
from nas.space.schema import RunConfig, parse_config
from nas.supernets.costs import arch_cost
from nas.supernets.space import Arch
from nas.supernets.strategies import STRATEGIES
from nas.supernets.strategies.sorted import SortedNet, SortedOptions, sorted_members
from nas.training.evaluation import evaluate_arch, run_calibration_batches
from nas.training.loop import RunError

logger = logging.getLogger(__name__)

SUMMARY_FILE = "sorted.json"
REPORT_FILE = "report.md"
LATENCY_TARGET = "cpu_fp32"

ProgressFactory = Callable[[int, str, int], Any]


@dataclass(frozen=True, slots=True)
class SortedMemberExport:
    """One exported member: its place ``t`` on the size knob, its arch, costs, accuracies and the export's report
    (paths in the final folder)."""

    index: int
    t: Fraction
    arch: Arch
    folder: str
    params: int
    macs: int
    inherited_val_accuracy: float
    inherited_test_accuracy: float
    report: ExportReport
    latency: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SortedExport:
    """What ``export_sorted`` wrote: the folder, its members (smallest first) and the content of ``sorted.json``."""

    out_dir: Path
    members: tuple[SortedMemberExport, ...]
    summary: dict[str, Any]


def member_folder(index: int, arch: Arch) -> str:
    """``m<index>_<arch short name>`` (two digits, three for a family of more than 100)."""
    return f"m{index:02d}_{arch.short_name()}"


def _share(value: float | None, reference: float | None) -> float | None:
    """``value / reference``; None when either is missing or the reference is 0."""
    if value is None or not reference:
        return None
    return value / reference


def _mean(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present and len(present) == len(values) else None


def _check_replaceable(root: Path) -> None:
    """The export replaces ``root`` as a whole: refuse a folder that holds anything but an earlier sorted export."""
    if not root.exists():
        return
    if not root.is_dir():
        raise RunError(f"{root} is a file; --out needs a new or empty folder (or an earlier `nas export --sorted` folder)")
    if any(root.iterdir()) and not (root / SUMMARY_FILE).is_file():
        raise RunError(f"{root} holds files that are not a sorted export's (it has no {SUMMARY_FILE}); choose a new or empty folder for --out")


def _in_place(report: ExportReport, out_dir: Path) -> ExportReport:
    """``report`` with its paths moved from the staging folder to ``out_dir``."""
    result = report.export
    moved = dataclasses.replace(result, path=out_dir / result.path.name, int8_path=out_dir / result.int8_path.name if result.int8_path else None)
    return dataclasses.replace(report, out_dir=out_dir, export=moved)


def run_config(run_dir: Path) -> RunConfig:
    """The config of the run in ``run_dir``, read as ``load_run`` reads it (without loading any weights)."""
    layout = RunDir(run_dir)
    if not layout.config.is_file():
        raise RunError(f"{run_dir} is not a nasforge run directory (no {CONFIG_FILE})")
    return parse_config(layout.config.read_text(), str(layout.config), base_dir=layout.origin_dir(), check_constraints=False)


def sorted_options(config: RunConfig, run_dir: Path) -> SortedOptions:
    """The sorted strategy's options of a run; ``RunError`` naming the run's strategy when it was trained with
    another (a strategy that subclasses ``SortedNet`` counts as sorted)."""
    strategy = config.training.strategy
    options = config.training.strategy_options()
    if not (issubclass(STRATEGIES.get(strategy), SortedNet) and isinstance(options, SortedOptions)):
        raise RunError(
            f"{run_dir} was trained with strategy {strategy!r}; `nas export --sorted` needs a run trained with the sorted strategy "
            "(`training: {strategy: sorted}` in the space file), whose nested family of subnets it exports"
        )
    return options


@locks_run_dir("run_dir", out="out")
def export_sorted(
    run_dir: Path,
    *,
    int8: bool = False,
    out: Path | None = None,
    progress: ProgressFactory | None = None,
    measure_seconds: float | None = None,
) -> SortedExport:
    """Export every member of the sorted family of the run in ``run_dir`` (see the module docstring) into ``out``
    (default ``RUN/sorted``). ``measure_seconds``: the latency time cap per member (default the run's
    ``search.measure_seconds``). Raises ``RunError`` for a run trained with another strategy or an ``out`` folder
    that holds other files, ``ExportError`` when a member's ONNX file fails its checks (a member whose INT8 model
    fails the agreement check is kept fp32-only, with the reason)."""
    from nas.latency import measure_latency, resolve_target

    run_dir = Path(run_dir)
    options = sorted_options(run_config(run_dir), run_dir)
    root = Path(out) if out else RunDir(run_dir).sorted
    durable.clear_leftovers(root)
    _check_replaceable(root)
    context = load_export_context(run_dir)
    config = context.config
    members = sorted_members(config.space, options.family_size)
    staging = durable.staging_folder(root)
    staging.mkdir(parents=True)
    calibration = run_calibration_batches(config, context.task_data.train)
    bar = progress(len(members) + 1, "sorted export", 0) if progress else None
    exported: list[SortedMemberExport] = []
    try:
        for index, member in enumerate(members):
            arch = member.arch
            if bar is not None:
                bar.set_postfix({"member": f"{index + 1}/{len(members)}", "arch": arch.short_name()})
            val = evaluate_arch(context.supernet, arch, calibration, context.task_data.val)
            test = evaluate_arch(context.supernet, arch, calibration, context.task_data.test)
            folder = member_folder(index, arch)
            report = export_loaded(context, arch, int8=int8, out=staging / folder, int8_optional=True)
            params, macs = arch_cost(config.space, arch)
            exported.append(SortedMemberExport(index, member.t, arch, folder, params, macs, val, test, report, {}))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.set_postfix({"latency": f"{len(members)} models, {LATENCY_TARGET}"})
        search = config.search
        target = resolve_target(LATENCY_TARGET, threads=search.threads, batch_size=search.batch_size)
        seconds = float(search.measure_seconds if measure_seconds is None else measure_seconds)
        models = {entry.folder: entry.report.export.path for entry in exported}
        latencies = measure_latency(models, target, max_seconds=seconds * len(models), seed=search.seed)
        exported = [dataclasses.replace(entry, latency=latencies[entry.folder].to_dict()) for entry in exported]
        if bar is not None:
            bar.update(1)
        summary = sorted_summary(run_dir, root, exported, family_size=options.family_size, measure_seconds=seconds)
        jsonio.write(staging / SUMMARY_FILE, summary)
        durable.atomic_write_text(staging / REPORT_FILE, sorted_report(summary, space_name=config.space.name))
        durable.replace_folder(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    final = tuple(dataclasses.replace(entry, report=_in_place(entry.report, root / entry.folder)) for entry in exported)
    return SortedExport(root, final, summary)


def sorted_summary(run_dir: Path, root: Path, members: list[SortedMemberExport], *, family_size: int, measure_seconds: float) -> dict[str, Any]:
    """What ``sorted.json`` holds (strict JSON: a share whose reference is missing or 0 is ``null``)."""
    largest = members[-1]
    reference_test = largest.report.test_accuracy
    reference_val = largest.inherited_val_accuracy
    entries = []
    for entry in members:
        report = entry.report
        entries.append(
            {
                "index": entry.index,
                "t": float(entry.t),
                "t_fraction": f"{entry.t.numerator}/{entry.t.denominator}",
                "arch_name": entry.arch.short_name(),
                "arch": entry.arch.to_dict(),
                "folder": entry.folder,
                "params": entry.params,
                "macs": entry.macs,
                "inherited_val_accuracy": entry.inherited_val_accuracy,
                "inherited_test_accuracy": entry.inherited_test_accuracy,
                "onnx_val_accuracy": report.val_accuracy,
                "onnx_test_accuracy": report.test_accuracy,
                "onnx_max_abs_error": report.export.max_abs_error,
                "int8": report.export.int8_path.name if report.export.int8_path else None,
                "int8_top1_agreement": report.export.int8_top1_agreement,
                "int8_test_accuracy": report.int8_test_accuracy,
                "int8_error": report.int8_error,
                "latency_ms": entry.latency,
                "share_of_largest": _share(report.test_accuracy, reference_test),
                "inherited_val_share_of_largest": _share(entry.inherited_val_accuracy, reference_val),
            }
        )
    shares = [entry["share_of_largest"] for entry in entries]
    fingerprint = largest.latency.get("fingerprint", {})
    resolved, run = root.resolve(), run_dir.resolve()
    where = resolved.relative_to(run).as_posix() if resolved.is_relative_to(run) else str(root)
    return {
        "run": str(run_dir),
        "folder": where,
        "strategy": "sorted",
        "family_size": family_size,
        "members_count": len(entries),
        "share_basis": "onnx_test_accuracy / the largest member's onnx_test_accuracy",
        "mean_share_of_largest": _mean(shares),
        "mean_share_of_smaller": _mean(shares[:-1]),
        "latency": {"target": LATENCY_TARGET, "measure_seconds_per_member": measure_seconds, "fingerprint": fingerprint},
        "members": entries,
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def sorted_report(summary: dict[str, Any], *, space_name: str) -> str:
    """``report.md``: the family as a table (smallest first), the family means and how latency was measured."""
    members = summary["members"]
    lines = [f"# nasforge sorted family: {space_name}", ""]
    lines += [
        (
            f"{summary['members_count']} nested members of the SortedNet family (family_size {summary['family_size']}, "
            "smallest first; member k sits at t on the one size knob that scales every dimension). Inherited accuracy: "
            "the supernet with the member active after batch-norm recalibration (the search's evaluation); ONNX accuracy: "
            "the exported `model.onnx` run by ONNX Runtime. Share: the member's ONNX test accuracy over the largest member's."
        ),
        "",
        "| member | t | arch | params | MACs | val acc (inherited) | test acc (inherited) | test acc (ONNX) | share of largest | "
        f"{summary['latency']['target']} ms: median [p10] ±CV | folder |",
        "|" + "---|" * 11,
    ]
    for entry in members:
        latency = entry["latency_ms"]
        cells = [
            str(entry["index"]),
            f"{entry['t']:.3f}",
            f"`{entry['arch_name']}`",
            f"{entry['params']:,}",
            f"{entry['macs']:,}",
            _accuracy(entry["inherited_val_accuracy"]),
            _accuracy(entry["inherited_test_accuracy"]),
            _accuracy(entry["onnx_test_accuracy"]),
            _percent(entry["share_of_largest"]),
            f"{latency['median_ms']:.4g} [{latency['p10_ms']:.4g}] ±{100 * latency['cv']:.1f}%",
            f"`{entry['folder']}`",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            f"Family mean share of the largest member's accuracy: {_percent(summary['mean_share_of_largest'])} over all "
            f"{summary['members_count']} members, {_percent(summary['mean_share_of_smaller'])} over the "
            f"{summary['members_count'] - 1} smaller ones (SortedNet reports 96% over 160 sub-models)."
        ),
        "",
    ]
    int8 = [entry for entry in members if entry["int8"] or entry["int8_error"]]
    if int8:
        lines += ["INT8 models:", ""]
        for entry in int8:
            if entry["int8"]:
                lines.append(
                    f"- member {entry['index']}: `{entry['int8']}`, top-1 agreement with fp32 {_percent(entry['int8_top1_agreement'])}, "
                    f"test accuracy {_accuracy(entry['int8_test_accuracy'])}"
                )
            else:
                lines.append(f"- member {entry['index']}: left out: {entry['int8_error']}")
        lines.append("")
    fingerprint = summary["latency"]["fingerprint"]
    # The fingerprint is the largest member's; each member runs at its own input size, so the shape is left out.
    described = ", ".join(f"{key} {value}" for key, value in fingerprint.items() if key not in ("cpu_flags", "target", "input_shape"))
    lines += [
        "## How latency was measured",
        "",
        (
            f"Every member's `model.onnx` on `{summary['latency']['target']}` ({described}), each at its own input size, all members measured "
            "interleaved in one call of the measurement protocol (warm-up, then rotating blocks until each median is "
            f"stable or the cap of {summary['latency']['measure_seconds_per_member']:g} s per member is reached). "
            "Median and 10th percentile of one run of the whole graph; ±CV is the robust spread (1.4826 MAD / median). "
            "Compare members by these side-by-side figures, not across runs of the machine."
        ),
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "REPORT_FILE",
    "SUMMARY_FILE",
    "SortedExport",
    "SortedMemberExport",
    "export_sorted",
    "member_folder",
    "run_config",
    "sorted_options",
    "sorted_report",
    "sorted_summary",
]
