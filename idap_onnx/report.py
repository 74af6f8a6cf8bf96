"""Human-readable text for the reports of ``idap_onnx.api`` (the CLI prints these).

Every renderer returns a string of aligned tables and never reads the model again. Big models
stay readable: one line per channel group, node lists cut to :data:`MAX_NAMES` names plus
``(+N more)``, and the frozen and declined lists cut to :data:`MAX_ROWS` rows. The JSON form
(``report.to_dict()``) always holds everything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from idap_onnx.accounting import format_count
from idap_onnx.api import (
    BlockInfo,
    BlockReport,
    Cost,
    GroupInfo,
    InspectReport,
    ModelInfo,
    PruneReport,
    Verification,
)

__all__ = [
    "MAX_NAMES",
    "MAX_ROWS",
    "render_blocks",
    "render_inspect",
    "render_prune",
    "summary_line",
    "table",
]

#: Node names shown per group cell before ``(+N more)``.
MAX_NAMES = 3
#: Rows shown of the frozen-group and declined-node lists before ``(+N more)``.
MAX_ROWS = 20


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: int = 2) -> str:
    """Columns padded to their widest cell; numbers (and ``-``) right-aligned, text left."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(headers))]
    numeric = [
        all(_is_number(row[k]) for row in cells[1:]) and len(cells) > 1
        for k in range(len(headers))
    ]
    lines = []
    for row in cells:
        parts = [
            row[k].rjust(widths[k]) if numeric[k] else row[k].ljust(widths[k])
            for k in range(len(headers))
        ]
        lines.append(" " * indent + "  ".join(parts).rstrip())
    return "\n".join(lines)


_NUMBER = re.compile(r"^(-|\d+(\.\d+)?( [KMGTPE])?( %)?)$")


def _is_number(text: str) -> bool:
    """Counts, ``format_count`` values and percentages (``-`` stands for none)."""
    return bool(_NUMBER.match(text))


def names(items: Sequence[str], limit: int = MAX_NAMES) -> str:
    """``a, b, c (+4 more)``; ``-`` for none."""
    if not items:
        return "-"
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} (+{len(items) - limit} more)"


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "-"


def summary_line(before: Cost, after: Cost) -> str:
    """``params 25.6 M -> 12.1 M (47.3 %), MACs 4.09 G -> 1.78 G (43.6 %)``: the percentages
    are what is left of the original."""
    return (
        f"params {format_count(before.params)} -> {format_count(after.params)} "
        f"({_pct(after.params, before.params)}), "
        f"MACs {format_count(before.macs)} -> {format_count(after.macs)} "
        f"({_pct(after.macs, before.macs)})"
    )


def _shape(dims: Sequence[object]) -> str:
    """``1x3x224x224``; ``[batch, 3, ?, ?]`` when some dims are symbolic or unknown."""
    if not dims:
        return "scalar"
    if all(isinstance(d, int) for d in dims):
        return "x".join(str(d) for d in dims)
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _model_lines(model: ModelInfo, input_shapes) -> list[str]:
    given = dict(input_shapes)
    lines = [f"Model: {model.path or '<in-memory model>'} (opset {model.opset}, "
             f"{model.nodes} nodes)"]
    for name, dims in model.inputs:
        used = given.get(name)
        at = f", analyzed at {_shape(used)}" if used is not None and tuple(used) != dims else ""
        lines.append(f"  input  {name}: {_shape(dims)}{at}")
    for name, dims in model.outputs:
        lines.append(f"  output {name}: {_shape(dims)}")
    return lines


def _verification_line(v: Verification | None) -> str:
    if v is None:
        return "Verification: skipped (--no-verify)"
    err = f"{v.max_rel_err:.3g}" if math.isfinite(v.max_rel_err) else str(v.max_rel_err)
    shapes = ", ".join(f"[{_shape(s)}]" for s in v.output_shapes)
    return (f"Verification: max relative output error {err} on random inputs (seed {v.seed}); "
            f"output shapes {shapes}")


def render_inspect(report: InspectReport) -> str:
    """The ``idap-onnx inspect`` text."""
    c = report.cost
    lines = _model_lines(report.model, report.input_shapes)
    lines.append("Ops: " + ", ".join(f"{op} {n}" for op, n in report.op_histogram))
    lines.append(f"Params {format_count(c.params)}, MACs {format_count(c.macs)} "
                 f"(FLOPs {format_count(c.flops)})")
    if report.unresolved:
        lines.append(f"  MACs of {len(report.unresolved)} nodes unresolved (counted 0): "
                     f"{names(report.unresolved)}")
    lines.append(f"Prunable share of MACs: {100.0 * report.prunable_share:.1f} %")
    frozen = report.frozen_groups
    exact = sum(g.exact for g in report.groups)
    lines += ["", f"Channel groups: {len(report.groups)} ({len(report.groups) - len(frozen)} "
              f"prunable, {len(frozen)} frozen, {exact} exact)"]
    if report.groups:
        rows = [
            (g.id, g.units, g.prunable_units, _exactness(g), format_count(g.macs),
             names([p.node for p in g.producers]), names([q.node for q in g.consumers]))
            for g in report.groups
        ]
        lines.append(table(("group", "units", "prunable", "exact", "MACs", "producers",
                            "consumers"), rows))
    if frozen:
        lines += ["", f"Frozen groups: {len(frozen)}"]
        rows = [(g.id, g.units, names(list(g.frozen_reasons), 2)) for g in frozen[:MAX_ROWS]]
        lines.append(table(("group", "units", "why"), rows))
        if len(frozen) > MAX_ROWS:
            lines.append(f"  (+{len(frozen) - MAX_ROWS} more; --json lists all)")
    inexact = [g for g in report.groups if not g.frozen and not g.exact]
    if inexact:
        lines += ["", f"Inexact groups (pruning them changes the outputs): {len(inexact)}"]
        rows = [(g.id, g.units, names(list(g.inexact_reasons), 2)) for g in inexact[:MAX_ROWS]]
        lines.append(table(("group", "units", "why"), rows))
        if len(inexact) > MAX_ROWS:
            lines.append(f"  (+{len(inexact) - MAX_ROWS} more; --json lists all)")
    if report.declined:
        lines += ["", f"Declined nodes: {len(report.declined)}"]
        rows = [(n, op, why) for n, op, why in report.declined[:MAX_ROWS]]
        lines.append(table(("node", "op", "why"), rows))
        if len(report.declined) > MAX_ROWS:
            lines.append(f"  (+{len(report.declined) - MAX_ROWS} more; --json lists all)")
    lines += ["", f"Removable blocks: {len(report.blocks)}"]
    if report.blocks:
        lines.append(_blocks_table(report.blocks, c.macs))
    return "\n".join(lines)


def _exactness(group: GroupInfo) -> str:
    if group.frozen:
        return "frozen"
    return "yes" if group.exact else "no"


def _blocks_table(blocks: Sequence[BlockInfo], total_macs: int) -> str:
    rows = [
        (b.name, b.kind, b.nodes, format_count(b.params), format_count(b.macs),
         _pct(b.macs, total_macs))
        for b in blocks
    ]
    return table(("block", "kind", "nodes", "params", "MACs", "of MACs"), rows)


def render_prune(report: PruneReport) -> str:
    """The ``idap-onnx prune`` text."""
    lines = _model_lines(report.model, report.input_shapes)
    ignore = f", ignore {', '.join(report.ignore)}" if report.ignore else ""
    lines.append(
        f"Plan: ratio {report.ratio:g}, score {report.score}, round-to {report.round_to}, "
        f"max-group-ratio {report.max_group_ratio:g}, seed {report.seed}{ignore}"
    )
    changed = [g for g in report.groups if g.removed]
    lines.append(f"Removed {report.removed_units} of {report.prunable_units} prunable units "
                 f"in {len(changed)} of {len(report.groups)} groups")
    if changed:
        rows = [(g.id, g.units, g.kept, len(g.removed), _pct(g.kept, g.units)) for g in changed]
        lines.append(table(("group", "before", "kept", "removed", "kept %"), rows))
    lines.append(summary_line(report.before, report.after))
    lines.append(_verification_line(report.verification))
    if report.output:
        lines.append(f"Wrote {report.output}")
    return "\n".join(lines)


def render_blocks(report: BlockReport) -> str:
    """The ``idap-onnx remove-blocks`` text."""
    lines = _model_lines(report.model, report.input_shapes)
    lines.append(f"Removed blocks: {len(report.blocks)}")
    lines.append(_blocks_table(report.blocks, report.before.macs))
    lines.append(summary_line(report.before, report.after))
    lines.append(_verification_line(report.verification))
    if report.output:
        lines.append(f"Wrote {report.output}")
    return "\n".join(lines)


def render_score(report, top: int = 10) -> str:
    """The ``idap-onnx score`` text: provider, the ``top`` least and most important units, and
    every removable block ranked by ``D_l`` (``report`` is a ``score_api.ScoreReport``)."""
    lines = _model_lines(report.model, report.input_shapes)
    lines.append(f"Data: {report.data}")
    held = (f", {report.validation_samples} validation samples held out (unused)"
            if report.validation_samples else "")
    lines.append(f"Calibrated on {report.samples} samples, batch {report.batch_size}{held}")
    t = report.timing
    lines.append(f"Provider: {report.provider} (--device {report.device}); "
                 f"{t.calibrate_s:.1f}s, {t.samples_per_s:.1f} samples/s")
    mc = "on" if report.mean_compensation else "off"
    lines.append(f"Score: {report.score}" + (f", mean compensation {mc}"
                                             if report.score == "idap" else ""))
    ranking = report.ranking()
    frozen = sum(g.frozen for g in report.groups)
    lines += ["", f"Removable units: {len(ranking)} in {len(report.groups) - frozen} groups; "
              f"frozen groups (not ranked): {frozen}"]
    k = max(int(top), 0)
    if ranking and k:
        for title, rows in (("Least important (removed first)", ranking[:k]),
                            ("Most important", ranking[::-1][:k])):
            lines += ["", f"{title}: {len(rows)}"]
            lines.append(table(("group", "unit", report.score, "producer"), [
                (r.group, r.unit, _score_text(r.score),
                 f"{r.producer}[{r.channel}]"
                 + (f" (+{r.more_producers} more)" if r.more_producers else ""))
                for r in rows
            ]))
    lines += ["", f"Blocks ranked by D_l (lowest adds least, removed first): {len(report.blocks)}"]
    if report.blocks:
        lines.append(table(("rank", "block", "kind", "nodes", "D_l"), [
            (i + 1, b.name, b.kind, b.nodes, _score_text(b.divergence))
            for i, b in enumerate(report.blocks)
        ]))
    return "\n".join(lines)


def _score_text(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)
