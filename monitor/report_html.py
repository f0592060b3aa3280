"""Self-contained HTML rendering of a DriftReport: inline CSS and SVG, no scripts, no links.

The file opens offline in any browser; nothing is fetched.
"""
from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .drift import DriftReport, FeatureDrift

_REF_COLOUR = "#4c78a8"
_CUR_COLOUR = "#f58518"
_W, _H, _PAD = 360, 120, 4

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:20px;margin:0 0 4px}
.summary{margin:8px 0 16px;color:#444}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;font-weight:600}
.drift{background:#fde2e1;color:#b42318}.ok{background:#e3f4e8;color:#1a7f37}
table{border-collapse:collapse;font-size:13px}
th,td{border-bottom:1px solid #e5e5e5;padding:6px 8px;text-align:right;vertical-align:middle}
th{background:#fafafa;position:sticky;top:0}
td.name,th.name{text-align:left;font-weight:600}
td.hit{color:#b42318;font-weight:600}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px;vertical-align:middle}
"""


def render_report(report: DriftReport, title: str) -> str:
    """The whole report as one HTML document."""
    rows = "\n".join(_row(f, report) for f in report.features)
    t = report.thresholds
    status = ('<span class="badge drift">dataset drift</span>' if report.dataset_drift
              else '<span class="badge ok">no dataset drift</span>')
    summary = (f"{status} {len(report.drifted_features)} of {len(report.features)} features drifted "
               f"({report.drift_share:.0%}; dataset drift at &ge; {t.dataset_share:.0%}). "
               f"Reference: {report.reference_rows:,} rows ({'data' if report.exact_reference else 'profile'}), "
               f"current: {report.current_rows:,} rows.")
    limits = (f"Thresholds: PSI &ge; {_fmt(t.psi)}, JS &ge; {_fmt(t.js)}, Wasserstein/std &ge; {_fmt(t.wasserstein)}, "
              f"KS &ge; {_fmt(t.ks)} with p &lt; {_fmt(t.ks_pvalue)}.")
    ignored = (f"<p>Ignored current-only columns: {html.escape(', '.join(report.ignored_columns))}</p>"
               if report.ignored_columns else "")
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="summary">{summary}<br>{limits}<br>Generated {generated}.</div>
{ignored}
<div class="legend">Distributions:<span style="background:{_REF_COLOUR}"></span>reference<span style="background:{_CUR_COLOUR}"></span>current</div>
<table><thead><tr><th class="name">feature</th><th>type</th><th>drift</th><th>PSI</th><th>JS</th>
<th>KS</th><th>KS p</th><th>Wasserstein/std</th><th>missing ref / cur</th><th>distributions</th></tr></thead>
<tbody>
{rows}
</tbody></table>
{_model_sections(report.model)}</body></html>
"""


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "&ndash;"
    if not math.isfinite(v):
        return "&infin;"
    if v != 0 and abs(v) < 10 ** -digits:
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def _row(f: FeatureDrift, report: DriftReport) -> str:
    s = f.stats

    def cell(key: str) -> str:
        cls = ' class="hit"' if key in f.crossed or (key == "ks_pvalue" and "ks" in f.crossed) else ""
        return f"<td{cls}>{_fmt(s.get(key))}</td>" if key in s else "<td>&ndash;</td>"

    badge = '<span class="badge drift">drift</span>' if f.drifted else '<span class="badge ok">ok</span>'
    plot = report.plots.get(f.name)
    svg = "" if plot is None else (_numeric_svg(*plot) if f.kind == "numeric" else _categorical_svg(*plot))
    return (f'<tr><td class="name">{html.escape(f.name)}</td><td>{f.kind}</td><td>{badge}</td>'
            f'{cell("psi")}{cell("js")}{cell("ks")}{cell("ks_pvalue")}{cell("wasserstein")}'
            f"<td>{f.reference_missing:.1%} / {f.current_missing:.1%}</td><td>{svg}</td></tr>")


def _numeric_svg(edges: np.ndarray, ref: np.ndarray, cur: np.ndarray) -> str:
    """Overlaid step histograms (density: share / bin width) over the given edges."""
    edges = np.asarray(edges, dtype=np.float64)
    if len(edges) + 1 == len(ref):  # profile bins: bound the open outer bins for drawing
        span = edges[-1] - edges[0] if len(edges) > 1 else 1.0
        edges = np.concatenate(([edges[0] - 0.1 * span], edges, [edges[-1] + 0.1 * span])) if len(edges) else np.array([-0.5, 0.5])
    widths = np.diff(edges)
    dens_r = np.asarray(ref, dtype=np.float64) / widths
    dens_c = np.asarray(cur, dtype=np.float64) / widths
    top = max(float(dens_r.max(initial=0.0)), float(dens_c.max(initial=0.0))) or 1.0
    x0, x1 = float(edges[0]), float(edges[-1])

    def path(dens: np.ndarray) -> str:
        sx = (_W - 2 * _PAD) / (x1 - x0)
        sy = (_H - 2 * _PAD) / top
        pts = [f"M{_PAD:.1f},{_H - _PAD:.1f}"]
        for i, d in enumerate(dens):
            xa = _PAD + (edges[i] - x0) * sx
            xb = _PAD + (edges[i + 1] - x0) * sx
            y = _H - _PAD - d * sy
            pts.append(f"L{xa:.1f},{y:.1f}L{xb:.1f},{y:.1f}")
        pts.append(f"L{_W - _PAD:.1f},{_H - _PAD:.1f}Z")
        return "".join(pts)

    return (f'<svg width="{_W}" height="{_H + 14}" viewBox="0 0 {_W} {_H + 14}">'
            f'<path d="{path(dens_r)}" fill="{_REF_COLOUR}" fill-opacity="0.35" stroke="{_REF_COLOUR}"/>'
            f'<path d="{path(dens_c)}" fill="{_CUR_COLOUR}" fill-opacity="0.35" stroke="{_CUR_COLOUR}"/>'
            f'<text x="{_PAD}" y="{_H + 12}" font-size="10">{_fmt(x0, 3)}</text>'
            f'<text x="{_W - _PAD}" y="{_H + 12}" font-size="10" text-anchor="end">{_fmt(x1, 3)}</text></svg>')


def _categorical_svg(labels: np.ndarray, ref: np.ndarray, cur: np.ndarray, top_n: int = 12) -> str:
    """Paired bars of category shares, the most frequent categories first."""
    r = np.asarray(ref, dtype=np.float64)
    c = np.asarray(cur, dtype=np.float64)
    r = r / r.sum() if r.sum() else r
    c = c / c.sum() if c.sum() else c
    order = np.argsort(-(r + c), kind="stable")[:top_n]
    peak = max(float(r[order].max(initial=0.0)), float(c[order].max(initial=0.0))) or 1.0
    slot = (_W - 2 * _PAD) / max(len(order), 1)
    bar = slot * 0.4
    parts = []
    for k, i in enumerate(order):
        x = _PAD + k * slot
        for j, (share, colour) in enumerate(((r[i], _REF_COLOUR), (c[i], _CUR_COLOUR))):
            h = share / peak * (_H - 2 * _PAD)
            parts.append(f'<rect x="{x + j * bar:.1f}" y="{_H - _PAD - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                         f'fill="{colour}" fill-opacity="0.8"><title>{html.escape(str(labels[i]))}: '
                         f'{"reference" if j == 0 else "current"} {share:.1%}</title></rect>')
        parts.append(f'<text x="{x + bar:.1f}" y="{_H + 12}" font-size="9" text-anchor="middle">'
                     f"{html.escape(str(labels[i])[:8])}</text>")
    return (f'<svg width="{_W}" height="{_H + 14}" '
            f'viewBox="0 0 {_W} {_H + 14}">{"".join(parts)}</svg>')


# ---- importance and group metrics (monitor/quality.py) ------------------------------------

def _model_sections(model: dict | None) -> str:
    if not model:
        return ""
    parts = []
    importance = model.get("importance") or {}
    sources = [(k, importance.get(k)) for k in ("training", "production") if (importance.get(k) or {}).get("features")]
    if sources:
        described = "; ".join(
            f"{k}: {html.escape(str(d.get('method', 'permutation')))} of {html.escape(str(d.get('metric', '')))} on "
            f"{d.get('rows', '?')} rows" for k, d in sources)
        parts.append(f'<h2>Feature importance</h2><div class="summary">{described}. Bars: mean importance '
                     f'per feature (<span style="color:{_REF_COLOUR}">training</span>, '
                     f'<span style="color:{_CUR_COLOUR}">production</span>).</div>'
                     + _importance_svg({k: d["features"] for k, d in sources}))
    groups = model.get("groups") or {}
    for source in ("training", "production"):
        for attribute, stats in sorted((groups.get(source) or {}).items()):
            parts.append(_group_section(source, attribute, stats))
    return "\n".join(parts)


def _importance_svg(by_source: dict[str, dict[str, float]]) -> str:
    """Horizontal bars per feature, training and production side by side, largest first."""
    names = sorted({n for d in by_source.values() for n in d},
                   key=lambda n: -max((d.get(n) or 0.0) for d in by_source.values()))[:30]
    peak = max([abs(v or 0.0) for d in by_source.values() for v in d.values()] + [1e-12])
    label_w, bar_w, row_h = 150, _W - 150, 18
    out = []
    for i, name in enumerate(names):
        y = i * row_h
        out.append(f'<text x="{label_w - 6}" y="{y + 12}" font-size="11" text-anchor="end">{html.escape(name[:24])}</text>')
        for k, (source, colour) in enumerate((("training", _REF_COLOUR), ("production", _CUR_COLOUR))):
            value = (by_source.get(source) or {}).get(name)
            if value is None:
                continue
            w = max(0.0, value) / peak * (bar_w - 4)
            out.append(f'<rect x="{label_w}" y="{y + 2 + k * 7:.1f}" width="{w:.1f}" height="6" fill="{colour}">'
                       f"<title>{html.escape(name)} {source}: {value:.4g}</title></rect>")
    height = max(1, len(names)) * row_h + 4
    return f'<svg width="{_W}" height="{height}" viewBox="0 0 {_W} {height}">{"".join(out)}</svg>'


def _group_section(source: str, attribute: str, stats: dict) -> str:
    per = stats.get("groups") or {}
    keys = [k for k in ("rows", "label_rate", "selection_rate", "tpr", "fpr", "error_rate", "mae", "mean_prediction")
            if any(k in g for g in per.values())]
    head = "".join(f"<th>{k.replace('_', ' ')}</th>" for k in keys)
    body = "".join(
        f'<tr><td class="name">{html.escape(str(g))}</td>'
        + "".join(f"<td>{v[k] if k == 'rows' else _fmt(v.get(k))}</td>" for k in keys) + "</tr>"
        for g, v in sorted(per.items()))
    diffs = "; ".join(f"{k.replace('_', ' ')} {_fmt(stats[k])}" for k in
                      ("demographic_parity_difference", "equal_opportunity_difference", "error_rate_difference",
                       "mae_difference") if stats.get(k) is not None)
    metric = "selection_rate" if "selection_rate" in keys else "mae"
    bars = _bars_svg({str(g): v.get(metric) for g, v in per.items()}, metric)
    return (f"<h2>Group metrics: {html.escape(attribute)} ({source})</h2>"
            f'<div class="summary">{html.escape(diffs) or "one group only"}</div>'
            f'<table><thead><tr><th class="name">group</th>{head}</tr></thead><tbody>{body}</tbody></table>{bars}')


def _bars_svg(values: dict[str, float | None], metric: str) -> str:
    items = [(k, v) for k, v in sorted(values.items()) if v is not None][:12]
    if not items:
        return ""
    peak = max(abs(v) for _, v in items) or 1.0
    slot = (_W - 2 * _PAD) / len(items)
    parts = []
    for i, (name, v) in enumerate(items):
        h = abs(v) / peak * (_H - 2 * _PAD)
        x = _PAD + i * slot
        parts.append(f'<rect x="{x + slot * 0.2:.1f}" y="{_H - _PAD - h:.1f}" width="{slot * 0.6:.1f}" height="{h:.1f}" '
                     f'fill="{_CUR_COLOUR}"><title>{html.escape(name)}: {metric} {v:.4g}</title></rect>'
                     f'<text x="{x + slot / 2:.1f}" y="{_H + 12}" font-size="9" text-anchor="middle">'
                     f"{html.escape(name[:10])}</text>")
    return f'<svg width="{_W}" height="{_H + 14}" viewBox="0 0 {_W} {_H + 14}">{"".join(parts)}</svg>'
