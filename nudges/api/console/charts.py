"""Charts drawn on the server as SVG: nothing to load, nothing to run in the browser.

They draw only what the table shows. A withheld group gets its label and its mark ("<11", "hidden") and no
bar or interval; a withheld month is a gap in its line. Colours and sizes are SVG presentation attributes,
not style attributes, so the page's Content-Security-Policy needs no 'unsafe-inline'.
"""

from __future__ import annotations

from markupsafe import Markup, escape

from ...tools.equity import Point, Stat

PALETTE = ("#1b6ca8", "#c4551f", "#2e8540", "#8a3ffc", "#b8860b", "#d12771", "#4f5d75", "#007d79")
WIDTH = 560


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = 12, fill: str = "#222") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}">'
            f"{escape(text)}</text>")


def rate_bars(stats: list[Stat], overall: Stat | None, title: str) -> Markup:
    """Acceptance rate per group: a bar, its 95 % Wilson interval as a whisker, the overall rate as a line."""
    left, right, row = 190, WIDTH - 60, 24
    span = right - left
    height = 34 + row * len(stats) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
             f'height="{height}" role="img" aria-label="{escape(title)}" class="chart">',
             f"<title>{escape(title)}</title>"]
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        x = left + span * tick
        parts.append(f'<line x1="{x:.1f}" y1="24" x2="{x:.1f}" y2="{height - 18}" stroke="#e3e3e3"/>')
        parts.append(_text(x, height - 4, f"{tick:.0%}", "middle", 10, "#666"))
    for i, s in enumerate(stats):
        y = 30 + row * i
        parts.append(_text(left - 8, y + 14, s.group, "end"))
        if not s.visible or s.acceptance_rate is None:
            mark = s.status if not s.visible else "no cards"
            parts.append(_text(left + 6, y + 14, f"{mark} (withheld)" if not s.visible else mark, fill="#777"))
            continue
        colour = "#b42318" if s.flag else "#1b6ca8"
        parts.append(f'<rect x="{left}" y="{y + 3}" width="{span * s.acceptance_rate:.1f}" height="{row - 8}" '
                     f'fill="{colour}" fill-opacity="0.75"><title>{escape(s.group)}: {s.acceptance_rate:.1%} '
                     f"({s.accepted} of {s.shown})</title></rect>")
        if s.ci_low is not None and s.ci_high is not None:
            x1, x2, mid = left + span * s.ci_low, left + span * s.ci_high, y + row / 2 - 1
            parts.append(f'<line x1="{x1:.1f}" y1="{mid:.1f}" x2="{x2:.1f}" y2="{mid:.1f}" stroke="#111" '
                         'stroke-width="1.5"/>')
            for x in (x1, x2):
                parts.append(f'<line x1="{x:.1f}" y1="{mid - 5:.1f}" x2="{x:.1f}" y2="{mid + 5:.1f}" stroke="#111"/>')
        parts.append(_text(right + 6, y + 14, f"{s.acceptance_rate:.0%}" + (" ⚑" if s.flag else ""), size=11))
    if overall is not None and overall.visible and overall.acceptance_rate is not None:
        x = left + span * overall.acceptance_rate
        parts.append(f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{height - 18}" stroke="#444" '
                     'stroke-dasharray="4 3"/>')
        parts.append(_text(x, 14, f"overall {overall.acceptance_rate:.0%}", "middle", 11, "#444"))
    parts.append("</svg>")
    return Markup("".join(parts))  # every text above is escaped


def trend_lines(points: list[Point], title: str) -> Markup:
    """Acceptance rate by month: one line per series (the overall first), broken where a month is withheld
    or has no cards, alike."""
    months = sorted({p.month for p in points})
    series: dict[str, list[Point]] = {}
    for p in sorted(points, key=lambda p: (p.dimension != "overall", p.group, p.month)):
        series.setdefault("overall" if p.dimension == "overall" else p.group, []).append(p)
    left, top, right, bottom = 44, 16, WIDTH - 190, 190
    height = bottom + 34
    step = (right - left) / max(len(months) - 1, 1)
    x_of = {m: left + step * i if len(months) > 1 else (left + right) / 2 for i, m in enumerate(months)}

    def y_of(rate: float) -> float:
        return bottom - (bottom - top) * rate

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
             f'height="{height}" role="img" aria-label="{escape(title)}" class="chart">',
             f"<title>{escape(title)}</title>"]
    for tick in (0, 0.5, 1.0):
        parts.append(f'<line x1="{left}" y1="{y_of(tick):.1f}" x2="{right}" y2="{y_of(tick):.1f}" stroke="#e3e3e3"/>')
        parts.append(_text(left - 6, y_of(tick) + 4, f"{tick:.0%}", "end", 10, "#666"))
    for m in months:
        parts.append(_text(x_of[m], bottom + 16, m, "middle", 10, "#666"))
    for i, (name, pts) in enumerate(series.items()):
        colour = "#111" if name == "overall" else PALETTE[i % len(PALETTE)]
        # A month without cards and a withheld month look alike (a gap, nothing in the legend): told apart,
        # the gaps would say in which months a small group had cards.
        by_month = {p.month: p for p in pts}
        run: list[str] = []
        for month in [*months, None]:
            q = by_month.get(month) if month is not None else None
            if q is not None and q.acceptance_rate is not None:
                run.append(f"{x_of[q.month]:.1f},{y_of(q.acceptance_rate):.1f}")
                continue
            if len(run) > 1:
                parts.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" stroke-width="2"/>')
            run = []
        for p in pts:
            if p.acceptance_rate is None:
                continue
            parts.append(f'<circle cx="{x_of[p.month]:.1f}" cy="{y_of(p.acceptance_rate):.1f}" r="3.5" '
                         f'fill="{colour}"><title>{escape(name)} {escape(p.month)}: {p.acceptance_rate:.1%} '
                         f"(95% CI {p.ci_low:.0%}–{p.ci_high:.0%}, {p.shown} shown)</title></circle>")
        y = top + 16 * i
        parts.append(f'<rect x="{right + 12}" y="{y}" width="10" height="10" fill="{colour}"/>')
        parts.append(_text(right + 28, y + 9, name, size=11))
    parts.append("</svg>")
    return Markup("".join(parts))  # every text above is escaped
