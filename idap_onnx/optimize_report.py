"""The human side of an ``optimize`` run: ``report.md`` and its PNG plots.

``report.json`` is ``OptimizeResult.to_dict()`` (schema in docs/CLI.md); this module renders
the same content as Markdown tables and two matplotlib plots: the metric against MACs across
the evaluated steps (accepted and undone), and the kept fraction of output channels per layer.
"""

from __future__ import annotations

from pathlib import Path

from idap_onnx.accounting import format_count
from idap_onnx.optimize import LANDING_TOLERANCE


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    """Markdown for a ``report.json`` dict; ``plots`` maps plot kind -> PNG file name."""
    o, f = report["original"], report["final"]
    lines = [
        "# idap-onnx optimize report",
        "",
        f"- metric: `{report['metric']}`; provider: `{report['provider']}`; "
        f"time: {report['seconds']:.1f} s",
        f"- params: {format_count(o['params'])} -> {format_count(f['params'])} "
        f"({100 * f['params'] / max(o['params'], 1):.1f} % kept)",
        f"- MACs: {format_count(o['macs'])} -> {format_count(f['macs'])} "
        f"({100 * f['macs'] / max(o['macs'], 1):.1f} % kept)",
        f"- {report['metric']}: {o['metric']:.4f} -> {f['metric']:.4f} "
        f"(drop {f['drop']:.4f}, relative output error {f['error']:.4f})",
        _recovery_line(report),
        *([f"- **{report['target_note']}**"] if report.get("target_note") else []),
        f"- stage 1 stopped on: {report.get('stop') or 'no stage 1'}",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in report["settings"].items()]
    lines += [
        "",
        "## Steps",
        "",
        "| stage | step | try | fraction | units removed | blocks | params | MACs | metric "
        "| error | drop | result | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        lines.append(
            f"| {s['stage']} | {s['iteration']} | {s['attempt']} | {s['fraction']:.4f} | "
            f"{s['units_removed']} | {' '.join(s['blocks']) or '-'} | "
            f"{format_count(s['params'])} | {format_count(s['macs'])} | {s['metric']:.4f} | "
            f"{s['error']:.4f} | {s['drop']:.4f} | "
            f"{'accepted' if s['accepted'] else 'undone'} | {s['seconds']:.1f} s |"
        )
    if report["block_divergence"]:
        lines += [
            "",
            "## Blocks by layer divergence D_l (ascending)",
            "",
            "| block | D_l | outcome |",
            "|---|---|---|",
        ]
        removed, essential = set(report["removed_blocks"]), set(report["essential_blocks"])
        for name, d in report["block_divergence"].items():
            outcome = (
                "removed"
                if name in removed
                else ("essential" if name in essential else "not tried")
            )
            lines.append(f"| `{name}` | {d:.4f} | {outcome} |")
    lines += _latency_lines(report.get("latency"), report["settings"].get("round_to", 1),
                            report.get("latency_plan"))
    lines += _export_lines(report.get("export"), report.get("latency"), report["metric"])
    lines += ["", "## Kept output channels per layer", ""]
    stripped = [n for n, k in report["kept"].items() if _stripped(k)]
    if stripped:
        lines += [
            f"**{len(stripped)} layer(s) cut below {100 * STRIPPED:.0f} % of their width** (marked "
            "below): a stripped stage or bottleneck. If the accuracy suffers, keep them with "
            "`--ignore NODE` or lower `--max-group-ratio`.",
            "",
        ]
    lines += ["| node | before | after |", "|---|---|---|"]
    lines += [
        f"| `{n}` | {k['before']} | {k['after']}{' (stripped)' if _stripped(k) else ''} |"
        for n, k in report["kept"].items()
    ]
    for kind, name in plots.items():
        lines += ["", f"![{kind}]({name})"]
    return "\n".join(lines) + "\n"


#: A layer kept below this fraction of its output channels is flagged in the report.
STRIPPED = 0.25


def _stripped(kept: dict) -> bool:
    return kept["after"] < STRIPPED * kept["before"]


def _recovery_line(report: dict) -> str:
    """How each removal was recovered, and what the least-squares refit cost in time."""
    settings, steps = report["settings"], report["steps"]
    parts = ["mean compensation"] if settings.get("mean_compensation") else []
    if settings.get("refit"):
        seconds = sum(s.get("refit_seconds", 0.0) for s in steps)
        layers = sum(s.get("refitted", 0) for s in steps)
        tries = sum(1 for s in steps if s["stage"] == 1)
        share = 100 * seconds / max(report["seconds"], 1e-9)
        parts.append(
            f"least-squares refit ({layers} consumer refits over {tries} stage-1 tries, "
            f"{seconds:.1f} s: {share:.0f} % of the run; `--no-refit` turns it off)"
        )
    return f"- recovery without training: {' + '.join(parts) or 'none'}"


def slower_hint(lat: dict | None, round_to: int | str) -> str | None:
    """A plain statement when the optimized model timed slower than the original, and
    what to try."""
    if not lat or lat["speedup"].get("optimized", 1.0) >= 1.0:
        return None
    fix = ("try --round-to auto (the default: widths on the runtime's fast multiples)"
           if round_to != "auto" else
           "the widths are on the runtime's multiples; a measured table (--target-latency, "
           "or --latency-table FILE) may choose better ones, or keep the original")
    return (f"the optimized model measured SLOWER than the original "
            f"({lat['speedup']['optimized']:.2f}x) on {lat['device']}; {fix}")


CONVERSION_BAR = 0.9  # below it, the report says the time fell slower than the MACs


def saved_per_mac_saved(speedup: float, macs_kept: float) -> float | None:
    """``(1 - t/t0) / (1 - m/m0)`` from the speed-up ``t0/t`` and the kept MACs fraction
    ``m/m0``: 1.0 when the time falls as fast as the MACs; None when no MAC was removed."""
    if macs_kept >= 1.0 or speedup <= 0:
        return None
    return (1 - 1 / speedup) / (1 - macs_kept)


def conversion_line(lat: dict | None) -> str | None:
    """The report's line on ``latency.saved_per_mac_saved``, with what to try below
    ``CONVERSION_BAR``."""
    ratio = (lat or {}).get("saved_per_mac_saved")
    if ratio is None:
        return None
    line = f"- latency saved / MACs saved: {ratio:.2f}"
    if ratio < CONVERSION_BAR:
        line += (" (the time fell slower than the MACs: what was removed cost less time per "
                 "MAC on this runtime than the rest of the model, its fixed costs per run "
                 "included; `--target-latency F` ranks removals by the time they save)")
    return line


def _latency_lines(lat: dict | None, round_to: int | str = "auto",
                   plan: dict | None = None) -> list[str]:
    """The latency table: each model's median and spread, and the speed-up over the
    original; the widths rule, the target and the table's predictions beside them."""
    if not lat and not plan:
        return []
    lines = ["", "## Latency (measured side by side)", ""]
    if lat:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in lat["inputs"].items())
        lines += [
            f"- {lat['device']}; batch {lat['batch']} ({shapes}); {lat['note']}",
            "",
            "| model | median ms | p10 ms | p90 ms | runs | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for name, t in lat["timings"].items():
            lines.append(
                f"| {name} | {t['median_ms']:.3f} | {t['p10_ms']:.3f} | {t['p90_ms']:.3f} | "
                f"{t['runs']} | {lat['speedup'][name]:.2f}x |"
            )
        lines.append("")
        conversion = conversion_line(lat)
        lines += [conversion] if conversion else []
    lines += _plan_lines(plan, lat)
    hint = slower_hint(lat, round_to)
    return lines + ([f"**{hint[0].upper()}{hint[1:]}.**"] if hint else [])


def _plan_lines(plan: dict | None, lat: dict | None) -> list[str]:
    if not plan:
        return []
    lines = [f"- widths: {plan['widths']} ({plan['source']})"]
    table = plan.get("table")
    if table:
        steps = ", ".join(f"{n} group(s) step {k}" for k, n in table["steps_in_channels"].items())
        lines.append(f"- latency table: {table['target']}; {table['groups']} groups ({steps}), "
                     f"measured in {table['seconds']:.1f} s, k {table['scale']:.3f}, "
                     f"b {table.get('ms_per_mb', 0.0):.4f} ms/MB"
                     + (f", saved to `{table['path']}`" if table.get("path") else ""))
        measured = ""
        if lat and "optimized" in lat["timings"]:
            measured = (f"; measured here {lat['timings']['original']['median_ms']:.3f} ms -> "
                        f"{lat['timings']['optimized']['median_ms']:.3f} ms")
        lines.append(f"- predicted by the table: original {table['original_ms']:.3f} ms -> "
                     f"result {plan['predicted_ms']:.3f} ms{measured}")
    if plan.get("target_ms") is not None:
        lines.append(f"- target latency: {plan['target_latency']} = {plan['target_ms']:.3f} ms "
                     f"(predicted {plan['predicted_ms']:.3f} ms)")
    if plan.get("landing"):
        passes = "; ".join(f"pass {p['pass']}: {p['result_ms']:.3f} of {p['original_ms']:.3f} ms "
                           f"({p['fraction']:.3f}{', kept' if p.get('kept') else ''})"
                           for p in plan["landing"])
        lines.append(f"- landing on the target, measured: {passes}. A pass more than "
                     f"{LANDING_TOLERANCE:.0%} off joined the table's probes and stage 1 "
                     "planned again from the original; the pass measured nearest the target "
                     "is the result, and the saved table is the one that planned it")
    return lines + [""]


def _export_lines(export: dict | None, lat: dict | None, metric: str) -> list[str]:
    """The original fp32, the pruned fp32 and the exported model side by side, the budget
    judged on the exported one (``optimize --precision``)."""
    if not export:
        return []
    lines = ["", f"## Deployed precision: {export['precision']}", ""]
    if export.get("applied") is None:
        return lines + [f"- {export['note']}"]
    lines += [
        f"- exported as {export['applied']} for {export['target']}"
        + (f" to `{export['path']}`" if export.get("path") else "")
        + (f"; {export['note']}" if export["note"] else ""),
    ]
    if export.get("int8") and export["int8"]["form"]:
        q = export["int8"]
        lines.append(f"- int8 form: {q['form']}, {q['quantized_nodes']} nodes quantized, "
                     f"{len(q['kept_fp32'])} kept fp32 ({q['note']})")
    timings = (lat or {}).get("timings", {})
    lines += [
        "",
        f"| model | {metric} | params | MACs | bytes | median ms | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"original": "original fp32", "optimized": "pruned fp32",
             "exported": f"pruned {export['applied']}" + (
                 "" if export["applied"] == export["precision"] else
                 f" (asked {export['precision']}: fp32 kept)")}
    for key, label in names.items():
        m = export["models"][key]
        t = timings.get(key)
        ms = f"{t['median_ms']:.3f}" if t else "-"
        up = f"{lat['speedup'][key]:.2f}x" if t else "-"
        lines.append(
            f"| {label} | {m['metric']:.4f} | {format_count(m['params'])} | "
            f"{format_count(m['macs'])} | {m['bytes']:,} | {ms} | {up} |"
        )
    return lines


def write_plots(report: dict, directory: Path, stem: str) -> dict[str, str]:
    """Write the two PNG plots next to the report; returns kind -> file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    steps = report["steps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    o = report["original"]
    ax.scatter([o["macs"] / 1e6], [o["metric"]], marker="*", s=120, label="original")
    for accepted, marker, label in ((True, "o", "accepted"), (False, "x", "undone")):
        pts = [(s["macs"] / 1e6, s["metric"]) for s in steps if s["accepted"] == accepted]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=label)
    ax.set_xlabel("MMACs")
    ax.set_ylabel(report["metric"])
    ax.set_title("metric vs MACs across steps")
    ax.legend()
    fig.tight_layout()
    name = f"{stem}_metric_vs_macs.png"
    fig.savefig(directory / name, dpi=100)
    plt.close(fig)
    files["metric vs MACs"] = name

    kept = report["kept"]
    if kept:
        fig, ax = plt.subplots(figsize=(max(6, len(kept) * 0.25), 4))
        fracs = [k["after"] / max(k["before"], 1) for k in kept.values()]
        ax.bar(range(len(fracs)), fracs)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("layer (graph order)")
        ax.set_ylabel("kept fraction of output channels")
        ax.set_title("kept fraction per layer")
        fig.tight_layout()
        name = f"{stem}_kept_per_layer.png"
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)
        files["kept per layer"] = name
    return files
