"""What a search leaves in its run directory: ``trials.csv``, ``pareto.json``, ``pareto.png`` and ``report.md``,
and the exported front (``pareto/<trial>_<arch>/``: fp32 + INT8 ONNX, the arch as YAML, static weights)."""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nas import durable, jsonio
from nas.export.subnet import ExportReport, export_loaded, load_export_context
from nas.run_dir import RunDir
from nas.run_lock import locks_run_dir
from nas.search.front import absent_reason, hypervolume, model_kind, pareto_front, target_accuracy
from nas.search.settings import latency_key
from nas.search.study import distinct_trials, feasible
from nas.supernets.space import Arch

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FrontExport:
    trial: int
    out_dir: Path
    report: ExportReport | None
    error: str | None = None


def front_folder(trial: Any) -> str:
    return f"t{trial.number:04d}_{Arch.from_json(trial.user_attrs['arch']).short_name()}"


def front_trials(study: Any, exports: dict[int, FrontExport] | None = None) -> dict[int, Any]:
    """The union of every target's front, by trial number (without the models ``exports`` failed to write)."""
    members: dict[int, Any] = {}
    for target in study.user_attrs["settings"]["targets"]:
        for trial in pareto_front(study, target, excluded=export_exclusions(exports or {}, target)):
            members[trial.number] = trial
    return dict(sorted(members.items()))


def export_exclusions(exports: dict[int, FrontExport], target: str) -> dict[int, str]:
    """Trial number -> why its export holds no model for ``target``: the export failed (no model at all), or, on an
    INT8 target, its INT8 model failed the export's agreement check. A front for a target holds only models that exist
    for it, so these trials are left out of that front."""
    reasons = {}
    for number, export in exports.items():
        if export.report is None:
            reasons[number] = f"the export failed: {export.error}"
        elif model_kind(target) == "int8" and export.report.int8_error:
            reasons[number] = f"the INT8 export failed: {export.report.int8_error}"
    return reasons


def export_fronts(run_dir: Path, study: Any, *, int8: bool, out_root: Path | None = None, progress: Any = None) -> dict[int, FrontExport]:
    """Export every front member (``export_trials``). A member whose export holds no model for a target leaves that
    target's front, which can bring a trial it dominated onto it; such newcomers are exported in turn, until the fronts
    are stable (at most once per distinct trial)."""
    exports: dict[int, FrontExport] = {}
    for _ in range(len(distinct_trials(study)) + 1):
        todo = [trial for number, trial in front_trials(study, exports).items() if number not in exports]
        if not todo:
            break
        exports.update(export_trials(run_dir, todo, int8=int8, out_root=out_root, progress=progress))
    return exports


@locks_run_dir("run_dir", out="out_root")
def export_trials(run_dir: Path, trials: list[Any], *, int8: bool, out_root: Path | None = None, progress: Any = None) -> dict[int, FrontExport]:
    """Export each trial's arch to ``out_root/<trial>_<arch>/`` (default ``RUN_DIR/pareto``); the run is loaded
    once. A failed INT8 agreement check leaves that member fp32-only, with the reason recorded. Each member folder is
    renamed into place once complete (``export_loaded``); what a killed export left in ``out_root`` is cleared."""
    from nas.export.onnx import ExportError

    root = Path(out_root) if out_root else RunDir(run_dir).pareto
    if root.is_dir():
        for leftover in list(root.iterdir()):
            for suffix in (durable.STAGING_SUFFIX, durable.PREVIOUS_SUFFIX):
                if leftover.is_dir() and leftover.name.endswith(suffix):
                    durable.clear_leftovers(leftover.with_name(leftover.name.removesuffix(suffix)))
    context = load_export_context(run_dir)
    results: dict[int, FrontExport] = {}
    bar = progress(len(trials), "export", 0) if progress else None
    try:
        for trial in trials:
            arch = Arch.from_json(trial.user_attrs["arch"], context.config.space, source=f"trial {trial.number}'s arch")
            out_dir = root / front_folder(trial)
            try:
                report = export_loaded(context, arch, int8=int8, out=out_dir, int8_optional=True)
                results[trial.number] = FrontExport(trial.number, out_dir, report, report.int8_error)
            except ExportError as error:
                logger.warning("exporting trial %d failed: %s", trial.number, error)
                results[trial.number] = FrontExport(trial.number, out_dir, None, str(error))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def _blank_if_none(value: Any) -> Any:
    return "" if value is None else value


def write_trials_csv(study: Any, path: Path) -> None:
    """One row per trial (every state), latency columns per target; the file is replaced atomically. ``accuracy`` is
    the fp32 model's validation accuracy, ``int8_accuracy`` the INT8 model's (``int8_error``: why there is none)."""
    targets = study.user_attrs["settings"]["targets"]
    columns = ["number", "state", "arch_name", "accuracy", "int8_accuracy"]
    for name in targets:
        columns += [f"{name}_median_ms", f"{name}_p10_ms", f"{name}_cv"]
    columns += ["params", "macs", "feasible", "duplicate_of", "worker", "evaluation_seconds", "int8_top1_agreement", "int8_error", "error", "arch"]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        arch = attrs.get("arch")
        row: list[Any] = [trial.number, trial.state.name, Arch.from_json(arch).short_name() if arch else "", trial.values[0] if trial.values else ""]
        row.append(_blank_if_none(attrs.get("int8_accuracy")))
        for name in targets:
            measurement = attrs.get(latency_key(name)) or {}
            row += [measurement.get("median_ms", ""), measurement.get("p10_ms", ""), measurement.get("cv", "")]
        row += [
            attrs.get("params", ""),
            attrs.get("macs", ""),
            feasible(trial) if trial.values else "",
            attrs.get("duplicate_of", ""),
            attrs.get("worker", ""),
            attrs.get("evaluation_seconds", ""),
            _blank_if_none(attrs.get("int8_top1_agreement")),
            attrs.get("int8_error") or "",
            attrs.get("error", ""),
            arch or "",
        ]
        writer.writerow(row)
    durable.atomic_write_text(path, buffer.getvalue())


def _member(trial: Any, target: str, targets: list[str], exports: dict[int, FrontExport], run_dir: Path) -> dict[str, Any]:
    """A front member on ``target``: its accuracies are those of the model the front ships for ``target``
    (``model``), as ONNX Runtime scores the file (the search's on the validation split, the export's on the test
    split)."""
    attrs = trial.user_attrs
    int8 = model_kind(target) == "int8"
    entry: dict[str, Any] = {
        "trial": trial.number,
        "arch_name": Arch.from_json(attrs["arch"]).short_name(),
        "arch": json.loads(attrs["arch"]),
        "model": _front_model(target),
        "val_accuracy": target_accuracy(trial, target),
        "latency_ms": {name: attrs[latency_key(name)] for name in targets},
        "params": attrs.get("params"),
        "macs": attrs.get("macs"),
    }
    if int8:
        entry["int8_top1_agreement"] = attrs.get("int8_top1_agreement")
    export = exports.get(trial.number)
    if export is not None:
        report = export.report
        model = (report.export.int8_path if int8 else report.export.path) if report else None
        entry["export"] = {
            "folder": str(export.out_dir.relative_to(run_dir)) if export.out_dir.is_relative_to(run_dir) else str(export.out_dir),
            "model": model.name if model else None,
            "test_accuracy": (report.int8_test_accuracy if int8 else report.test_accuracy) if report else None,
            "val_accuracy": (report.int8_val_accuracy if int8 else report.val_accuracy) if report else None,
            "onnx_max_abs_error": report.export.max_abs_error if report else None,
            "int8_top1_agreement": report.export.int8_top1_agreement if report else None,
            "error": export.error,
        }
    return entry


def pareto_summary(study: Any, exports: dict[int, FrontExport], run_dir: Path) -> dict[str, Any]:
    """What ``pareto.json`` holds. Per target: the front (``members``) and ``absent``, every feasible trial that has
    no model for that target, with the reason (no INT8 model after the agreement check, an export that failed)."""
    settings = study.user_attrs["settings"]
    targets = list(settings["targets"])
    trials = distinct_trials(study)
    summary: dict[str, Any] = {
        "study": RunDir(run_dir).relative(RunDir(run_dir).study),
        "settings": settings,
        "constraints": study.user_attrs.get("constraints", []),
        "distinct_trials": len(trials),
        "fronts": {},
    }
    for index, name in enumerate(targets, start=1):
        excluded = export_exclusions(exports, name)
        front = pareto_front(study, name, excluded=excluded)
        reference = 1.1 * max((trial.values[index] for trial in trials), default=1.0)
        absent = [(trial, absent_reason(trial, name, excluded)) for trial in trials if feasible(trial)]
        summary["fronts"][name] = {
            "hypervolume": hypervolume(front, index, reference, target=name),
            "hypervolume_reference": {"accuracy": 0.0, "latency_ms": reference},
            "members": [_member(trial, name, targets, exports, run_dir) for trial in front],
            "absent": [
                {"trial": trial.number, "arch_name": Arch.from_json(trial.user_attrs["arch"]).short_name(), "reason": reason}
                for trial, reason in absent
                if reason is not None
            ],
        }
    return summary


def plot_fronts(study: Any, path: Path, exports: dict[int, FrontExport] | None = None) -> None:
    """Accuracy vs measured latency, one panel per target; the front highlighted, infeasible trials crossed. A panel
    shows the trials with a model for its target, at that model's accuracy (``target_accuracy``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(study.user_attrs["settings"]["targets"])
    trials = distinct_trials(study)
    figure, axes = plt.subplots(1, len(targets), figsize=(5.2 * len(targets), 4.2), squeeze=False)
    for index, (name, axis) in enumerate(zip(targets, axes[0], strict=False), start=1):
        excluded = export_exclusions(exports or {}, name)
        present = [trial for trial in trials if absent_reason(trial, name, excluded) is None]
        good = [trial for trial in present if feasible(trial)]
        bad = [trial for trial in present if not feasible(trial)]
        front = pareto_front(study, name, excluded=excluded)
        axis.scatter([t.values[index] for t in good], [target_accuracy(t, name) for t in good], s=18, color="0.65", label="trials")
        if bad:
            axis.scatter([t.values[index] for t in bad], [target_accuracy(t, name) for t in bad], s=18, marker="x", color="0.8", label="infeasible")
        axis.step([t.values[index] for t in front], [target_accuracy(t, name) for t in front], where="post", color="tab:red", linewidth=1.2)
        axis.scatter([t.values[index] for t in front], [target_accuracy(t, name) for t in front], s=34, color="tab:red", label="Pareto front", zorder=3)
        fingerprint = (front or trials)[0].user_attrs[latency_key(name)].get("fingerprint", {}) if (front or trials) else {}
        axis.set_title(f"{name} ({fingerprint.get('threads', '?')} thread(s), batch {fingerprint.get('batch_size', '?')})")
        axis.set_xlabel("measured latency, median (ms)")
        axis.set_ylabel("validation accuracy")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=120)
    plt.close(figure)
    durable.atomic_write_bytes(path, image.getvalue())


def op_type_comparison(members: list[FrontExport]) -> list[Any]:
    """fp32 vs INT8 time per op kind, summed over the exported front members that have both models (CPU)."""
    from nas.latency.op_profile import compare_op_types, op_type_profile
    from nas.latency.targets import resolve_target

    fp32_total: dict[str, float] = {}
    int8_total: dict[str, float] = {}
    fp32_target, int8_target = resolve_target("cpu_fp32"), resolve_target("cpu_int8")
    for member in members:
        int8_path = member.out_dir / "model.int8.onnx"
        if member.report is None or not int8_path.exists():
            continue
        for total, path, target in ((fp32_total, member.out_dir / "model.onnx", fp32_target), (int8_total, int8_path, int8_target)):
            for kind, microseconds in op_type_profile(path, target).items():
                total[kind] = total.get(kind, 0.0) + microseconds
    if not fp32_total:
        return []
    return compare_op_types(fp32_total, int8_total)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "(" + ", ".join(f"{key} {item}" for key, item in value.items()) + ")"
    if isinstance(value, (list, tuple)):
        return "x".join(str(item) for item in value)
    return str(value)


def measured_cpus(trials: list[Any], targets: list[str]) -> dict[str, list[str] | None]:
    """CPU model -> its recorded inference flags (``None`` where the fingerprint records none), over the device
    fingerprints stored with the CPU measurements of ``trials`` (never the CPU of the machine running this)."""
    from nas.latency.targets import CPU_PROVIDER

    cpus: dict[str, list[str] | None] = {}
    for trial in trials:
        for name in targets:
            fingerprint = (trial.user_attrs.get(latency_key(name)) or {}).get("fingerprint") or {}
            if fingerprint.get("provider") != CPU_PROVIDER:
                continue
            model = str(fingerprint.get("cpu_model") or "unknown CPU")
            flags = fingerprint.get("cpu_flags")
            if isinstance(flags, list):
                cpus[model] = sorted(set(cpus.get(model) or []) | {str(flag) for flag in flags})
            else:
                cpus.setdefault(model, None)
    return cpus


def int8_instructions_sentence(cpus: dict[str, list[str] | None]) -> str:
    """Whether each measured CPU (``measured_cpus``) has 8-bit dot-product instructions, by its recorded flags."""
    from nas.latency.fingerprint import int8_dot_product_flags

    if not cpus:
        return "The measurements record no CPU fingerprint, so whether their CPU has 8-bit dot-product instructions (VNNI / AMX) is unknown."
    phrases = []
    for model, flags in cpus.items():
        if flags is None:
            phrases.append(f"{model} (its fingerprint records no CPU flags, so whether it has 8-bit dot-product instructions is unknown)")
            continue
        present = int8_dot_product_flags(flags)
        if present:
            phrases.append(f"{model} has 8-bit dot-product instructions ({', '.join(present)})")
        else:
            phrases.append(f"{model} has no 8-bit dot-product instructions (VNNI / AMX)")
    return "CPU of the measurements, by the flags in their device fingerprint: " + "; ".join(phrases) + "."


def _fmt_latency(measurement: dict[str, Any]) -> str:
    if measurement.get("predicted"):
        return f"{measurement['median_ms']:.4g} predicted ({measurement.get('statistic', 'median')}, {measurement.get('predictor')})"
    return f"{measurement['median_ms']:.4g} [{measurement['p10_ms']:.4g}] ±{100 * measurement['cv']:.1f}%"


def _front_model(target: str) -> str:
    return "model.int8.onnx" if model_kind(target) == "int8" else "model.onnx"


def write_report(study: Any, summary: dict[str, Any], path: Path, *, op_types: list[Any], space_name: str, elapsed: dict[str, float]) -> None:
    settings = summary["settings"]
    targets = list(settings["targets"])
    lines = [f"# nasforge search report: {space_name}", ""]
    lines += [
        (
            f"{summary['distinct_trials']} distinct architectures evaluated with the `{settings['sampler']}` sampler "
            f"(seed {settings['seed']}); objectives: validation accuracy (inherited weights, BN recalibrated) and median "
            f"latency on {', '.join(f'`{name}`' for name in targets)}. The study is `{summary['study']}` (Optuna journal)."
        ),
        "",
    ]
    if summary["constraints"]:
        lines += ["Constraints: " + "; ".join(f"`{text}`" for text in summary["constraints"]) + ". Infeasible trials are never on a front.", ""]
    if elapsed:
        lines += ["Wall time: " + ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in elapsed.items()) + ".", ""]
    for name in targets:
        front = summary["fronts"][name]
        lines += [
            f"## Front on `{name}`",
            "",
            f"Hypervolume {front['hypervolume']:.4g} (reference: accuracy 0, latency {front['hypervolume_reference']['latency_ms']:.4g} ms).",
            "",
            (
                f"Accuracy is that of the model this front ships for `{name}`, `{_front_model(name)}`, run by ONNX Runtime "
                "(validation: the file the search scored, which is the file exported; test: the exported file)."
            ),
            "",
        ]
        header = (
            "| trial | arch | val acc | test acc (exported) | "
            + " | ".join(f"{target} ms: median [p10] ±CV" for target in targets)
            + " | params | MACs | INT8 agreement | folder |"
        )
        lines += [header, "|" + "---|" * (8 + len(targets))]
        for member in front["members"]:
            export = member.get("export") or {}
            test = f"{export['test_accuracy']:.4f}" if export.get("test_accuracy") is not None else "-"
            agreement = f"{export['int8_top1_agreement']:.3f}" if export.get("int8_top1_agreement") is not None else (export.get("error") or "-")
            cells = [str(member["trial"]), f"`{member['arch_name']}`", f"{member['val_accuracy']:.4f}", test]
            cells += [_fmt_latency(member["latency_ms"][target]) for target in targets]
            cells += [f"{member['params']:,}", f"{member['macs']:,}", agreement, f"`{export.get('folder', '-')}`"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if front.get("absent"):
            lines += [f"Not on this front, having no model for `{name}`:", ""]
            lines += [f"- trial {entry['trial']} `{entry['arch_name']}`: {entry['reason']}" for entry in front["absent"]]
            lines.append("")
    check_path = RunDir(path.parent).front_check
    if settings.get("latency") == "predicted" and check_path.exists():
        lines += predicted_latency_section(jsonio.loads(check_path.read_text()))
    lines += ["## How latency was measured", ""]
    trials = distinct_trials(study)
    for name in targets:
        fingerprint = trials[0].user_attrs[latency_key(name)].get("fingerprint", {}) if trials else {}
        described = ", ".join(f"{key} {_describe(value)}" for key, value in fingerprint.items() if key not in ("cpu_flags", "target", "input_shape"))
        flags = fingerprint.get("cpu_flags")
        lines.append(f"- `{name}`: {described}" + (f", CPU flags {', '.join(flags)}" if flags else ""))
    lines += [
        "",
        (
            "ONNX Runtime, one session per model on this machine (the search driver, with every evaluator idle); warm-up, "
            "then the candidates of each batch measured interleaved in blocks until each median is stable or the time cap "
            f"is reached. Figures are the median and 10th percentile of one run of the whole graph at batch size "
            f"{settings['batch_size']}; ±CV is the robust spread of the samples (1.4826 MAD / median). See the README's "
            "measurement protocol."
        ),
        "",
    ]
    if op_types:
        both = [row for row in op_types if row.fp32_us > 0 and row.int8_us > 0]
        faster = [row for row in both if row.int8_us < row.fp32_us]
        slower = [row for row in both if row.int8_us >= row.fp32_us]
        int8_only = [row for row in op_types if row.fp32_us == 0]
        fp32_only = [row for row in op_types if row.int8_us == 0]
        lines += [
            "## INT8 vs fp32 by op type (this CPU)",
            "",
            "ONNX Runtime profiles of the exported front, fp32 and static QDQ INT8, summed over its members:",
            "",
        ]
        lines += ["| op kind | fp32 µs | INT8 µs | INT8 speed-up |", "|---|---|---|---|"]
        for row in op_types:
            speedup = f"{row.speedup:.2f}x" if row.fp32_us > 0 and row.int8_us > 0 else "-"
            lines.append(f"| {row.kind} | {row.fp32_us:.1f} | {row.int8_us:.1f} | {speedup} |")
        total_fp32 = sum(row.fp32_us for row in op_types)
        total_int8 = sum(row.int8_us for row in op_types)
        lines += [
            "",
            "Faster in INT8: " + (", ".join(f"{row.kind} ({row.speedup:.2f}x)" for row in faster) or "none") + ".",
            "Slower in INT8: " + (", ".join(f"{row.kind} ({row.speedup:.2f}x)" for row in slower) or "none") + ".",
            "Only in the INT8 graph (quantisation overhead, unfused activations, layout changes): "
            + (", ".join(row.kind for row in int8_only) or "none")
            + ".",
            "Only in the fp32 graph (fused away or replaced in INT8): " + (", ".join(row.kind for row in fp32_only) or "none") + ".",
            (
                f"Profiled total: fp32 {total_fp32:.0f} µs, INT8 {total_int8:.0f} µs (profiling adds per-node overhead, so use "
                "these for proportions; the fronts above use the unprofiled medians). " + int8_instructions_sentence(measured_cpus(trials, targets))
            ),
            "",
        ]
    durable.atomic_write_text(path, "\n".join(lines))


def predicted_latency_section(check: dict[str, Any]) -> list[str]:
    """report.md lines for a predicted-latency search: each front member's predicted against measured latency."""
    lines = [
        "## Predicted against measured latency",
        "",
        "The search read latency from the hardware profile's predictor; every front member was then exported again and "
        "measured. A member whose measurement breaks a latency limit is flagged; a measurement the protocol could not "
        "stabilise (a busy machine) says so, and its error then says more about the machine than about the predictor.",
        "",
    ]
    for name, rows in check["targets"].items():
        statistic = rows[0].get("statistic", "median") if rows else "median"
        lines += [f"`{name}` ({statistic} of each measurement):", "", f"| trial | arch | predicted ms | measured ms ({statistic}) | error | limit |"]
        lines.append("|---|---|---|---|---|---|")
        for row in rows:
            measured = row["measured"][f"{row.get('statistic', 'median')}_ms"] if row["measured"] else None
            error = f"{100 * row['relative_error']:+.1f}%" if row["relative_error"] is not None else "-"
            limit = "" if row["limit_ms"] is None else (f"**breaks {row['limit_ms']:g}**" if row["breaks_limit"] else f"meets {row['limit_ms']:g}")
            shown = "-" if measured is None else f"{measured:.4g}"
            if row["measured"] and not row["measured"].get("stable", True):
                shown += f" (unstable, cv {100 * row['measured']['cv']:.0f}%)"
            cells = [str(row["trial"]), f"`{Arch.from_json(row['arch']).short_name()}`", f"{row['predicted_ms']:.4g}", shown, error, limit]
            lines.append("| " + " | ".join(cells) + " |")
        errors = [abs(row["relative_error"]) for row in rows if row["relative_error"] is not None]
        if errors:
            lines += ["", f"Mean absolute error {100 * sum(errors) / len(errors):.1f}% over {len(errors)} member(s)."]
        lines.append("")
    return lines


def op_type_summary(op_types: list[Any]) -> list[dict[str, Any]]:
    """The INT8-vs-fp32 comparison (``OpTypeComparison`` rows) as ``pareto.json`` holds it: a kind found in one graph
    only has no speed-up (``null``, and ``speedup_note`` says which graph) instead of ``inf`` or 0."""
    entries = []
    for row in op_types:
        entry: dict[str, Any] = {"kind": row.kind, "fp32_us": row.fp32_us, "int8_us": row.int8_us, "speedup": row.speedup}
        if not (row.fp32_us > 0 and row.int8_us > 0):
            entry["speedup"] = None
            entry["speedup_note"] = "only in fp32" if row.fp32_us > 0 else "only in INT8" if row.int8_us > 0 else "in neither graph"
        entries.append(entry)
    return entries


@locks_run_dir("run_dir")
def write_outputs(
    run_dir: Path, study: Any, exports: dict[int, FrontExport], *, space_name: str, op_types: list[Any], elapsed: dict[str, float]
) -> dict[str, Any]:
    """Write trials.csv, pareto.json, pareto.png and report.md into ``run_dir`` (each replaced atomically, under the
    run folder's lock); returns the pareto summary."""
    run_dir = Path(run_dir)
    write_trials_csv(study, RunDir(run_dir).trials_csv)
    summary = pareto_summary(study, exports, run_dir)
    if op_types:
        summary["int8_vs_fp32_op_types"] = op_type_summary(op_types)
    jsonio.write(RunDir(run_dir).pareto_json, summary)
    plot_fronts(study, RunDir(run_dir).pareto_plot, exports)
    write_report(study, summary, RunDir(run_dir).report, op_types=op_types, space_name=space_name, elapsed=elapsed)
    return summary


__all__ = [
    "FrontExport",
    "export_exclusions",
    "export_fronts",
    "export_trials",
    "front_trials",
    "op_type_comparison",
    "op_type_summary",
    "plot_fronts",
    "write_outputs",
]
