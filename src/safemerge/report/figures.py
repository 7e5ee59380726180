"""The report's figures as PNG bytes (matplotlib's Agg canvas, no pyplot: no global state touched).

- knowledge-safety scatter (MergeAlign, Figure 2): x = knowledge (mean accuracy over the knowledge
  domains, `Results.focus`), y = safety (mean safe-answer rate over the safety sets); every model a labelled
  point, the Pareto frontier (points no other model beats on both axes) ringed and joined.
- L2 distances (MergeAlign, Figure 3): for each model, ‖θ − θ_expert‖₂ and ‖θ − θ_aligned‖₂ as
  grouped horizontal bars.
"""

from __future__ import annotations

import io
from typing import Sequence

from safemerge.report.results import Results, knowledge, safety
from safemerge.report.tables import fmt_l2, method_label

_COLORS = {"pretrained": "#7f7f7f", "aligned": "#2ca02c", "expert": "#1f77b4", "mergealign": "#d62728",
           "slerp": "#ff7f0e", "ties": "#9467bd", "dare_ties": "#8c564b", "evomm": "#e377c2",
           "cocktail": "#bcbd22", "dpo": "#17becf", "orpo": "#393b79"}
_MARKERS = {"pretrained": "s", "aligned": "s", "expert": "s", "mergealign": "*", "dpo": "D", "orpo": "D"}
_DPI = 110


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates maximised), in increasing x.

    q dominates p when q.x ≥ p.x and q.y ≥ p.y with at least one strict; equal points are all kept.
    O(n log n): sweep by decreasing x (ties: decreasing y), keep a point if its y beats every y so far.
    """
    points = [(round(x, 9), round(y, 9)) for x, y in points]  # float noise makes no point dominate an equal one
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    keep, best_y, prev = [], float("-inf"), None
    for i in order:
        x, y = points[i]
        if y > best_y or (prev is not None and (x, y) == prev):
            keep.append(i)
            best_y, prev = max(best_y, y), (x, y)
    return sorted(keep, key=lambda i: (points[i][0], -points[i][1]))


def knowledge_safety_points(res: Results) -> dict[str, tuple[float, float]]:
    """name -> (knowledge, safety) for every model that has both."""
    pts = {}
    for m in res.models.values():
        k, s = knowledge(m, res), safety(m)
        if k is not None and s is not None:
            pts[m.name] = (k, s)
    return pts


def knowledge_safety_figure(res: Results) -> bytes | None:
    """The scatter as PNG bytes; None when no model has both a domain accuracy and a safety rate."""
    pts = knowledge_safety_points(res)
    if not pts:
        return None
    fig, ax = _new_figure(8.0, 6.0)
    names = list(pts)
    xy = [pts[n] for n in names]
    front = pareto_frontier(xy)
    fx, fy = [100 * xy[i][0] for i in front], [100 * xy[i][1] for i in front]
    ax.plot(fx, fy, "--", color="#555555", lw=1, zorder=1, label="Pareto frontier")
    ax.scatter(fx, fy, s=260, facecolors="none", edgecolors="#555555", lw=1.2, zorder=2)
    seen = set()
    for n, (x, y) in zip(names, xy):
        method = res.models[n].method
        label = None if method in seen else method_label(method)
        seen.add(method)
        ax.scatter(100 * x, 100 * y, s=140 if _MARKERS.get(method) == "*" else 60, marker=_MARKERS.get(method, "o"),
                   color=_COLORS.get(method, "#444444"), edgecolors="white", lw=0.6, zorder=3, label=label)
    _pad_limits(ax, [100 * x for x, _ in xy], [100 * y for _, y in xy])
    _label_points(ax, names, [(100 * x, 100 * y) for x, y in xy])
    ax.set_xlabel(f"knowledge: accuracy on {' and '.join(res.focus)} (%)" if len(res.focus) < 3
                  else "knowledge: mean domain accuracy (%)")
    ax.set_ylabel("safety: safe-answer rate (%)")
    ax.set_title("Knowledge vs safety (up and right is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return _png(fig)


def l2_figure(res: Results) -> bytes | None:
    """Grouped horizontal bars of each model's L2 distance to each reference; None without L2 data."""
    models = [m for m in res.models.values() if m.l2]
    if not models:
        return None
    refs = list(dict.fromkeys(k for m in models for k in m.l2))
    fig, ax = _new_figure(8.0, max(2.5, (0.18 + 0.12 * len(refs)) * len(models) + 1.3))
    height = 0.8 / len(refs)
    colors = {"expert": "#1f77b4", "aligned": "#2ca02c"}
    for j, r in enumerate(refs):
        ys = [i + (j - (len(refs) - 1) / 2) * height for i in range(len(models))]
        vals = [m.l2.get(r, 0.0) for m in models]
        ax.barh(ys, vals, height=height * 0.95, label=f"to {r}", color=colors.get(r, f"C{j + 2}"))
        for y, m in zip(ys, models):
            text = f" {fmt_l2(m.l2[r])}" if r in m.l2 else " not measured"
            ax.text(m.l2.get(r, 0.0), y, text, va="center", fontsize=6.5, color="#555555")
    ax.set_yticks(range(len(models)), [m.name for m in models], fontsize=8)
    ax.set_xlim(0, 1.12 * max((v for m in models for v in m.l2.values()), default=1.0) or 1.0)
    ax.set_ylim(len(models) - 0.5, -0.5)
    ax.set_xlabel("L2 distance ‖θ − θ_ref‖₂")
    ax.set_title("Distance of each model to the expert and to the aligned model")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=len(refs), fontsize=8, frameon=False)
    return _png(fig)


# ---- helpers ----------------------------------------------------------------------------------------

def _new_figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()


def _pad_limits(ax, xs: list[float], ys: list[float]) -> None:
    for lo_hi, setter in ((xs, ax.set_xlim), (ys, ax.set_ylim)):
        lo, hi = min(lo_hi), max(lo_hi)
        pad = max(2.0, 0.08 * (hi - lo))
        setter(lo - pad, hi + pad * 2)


def _label_points(ax, names: list[str], xy: list[tuple[float, float]]) -> None:
    """Label each point beside it; a label that would cover a marker or an earlier label, or sit nearer another
    marker than its own, moves to the nearest free spot (right, left, then further up or down), with a leader line
    when it moved (or could not get clear of another marker).

    Greedy in axes-fraction space, points taken bottom-up: cheap, deterministic, fine for ~30 points.
    Labels stay inside the axes, so a crowded plot never grows the figure.
    """
    to_axes = ax.transData + ax.transAxes.inverted()
    # (left, bottom, width) boxes already taken: the markers first, then each label as it is placed
    placed = [(px - 0.012, py - 0.02, 0.024) for px, py in (to_axes.transform(p) for p in xy)]

    def free(lx: float, ly: float, w: float) -> bool:
        inside = 0.0 <= lx and lx + w <= 1.0 and 0.0 <= ly <= 0.96
        return inside and not any(qy - 0.028 < ly < qy + 0.03 and lx < qx + qw and qx < lx + w
                                  for qx, qy, qw in placed)

    points = [tuple(to_axes.transform(p)) for p in xy]

    def clearance(i: int, lx: float, ly: float, w: float) -> float:
        """How many times farther the label's box is from the nearest other marker than from its own point (squared):
        a label much nearer another marker is read as that marker's."""
        def d(q):
            dx, dy = max(lx - q[0], 0.0, q[0] - lx - w), max(ly - q[1], 0.0, q[1] - ly - 0.02)
            return dx * dx + dy * dy
        return min((d(q) for j, q in enumerate(points) if j != i), default=float("inf")) / max(d(points[i]), 1e-6)

    for i in sorted(range(len(names)), key=lambda i: (xy[i][1], xy[i][0])):
        px, py = points[i]
        width = 0.0105 * len(names[i])
        xs = (px + 0.012, px - 0.012 - width)                     # right of the point, left of it
        spots = [(x, py + 0.012) for x in xs] + [(x, py - 0.04) for x in xs]
        for k in range(1, 16):
            spots += [(x, py + 0.012 + dy) for dy in (0.034 * k, -0.034 * k - 0.052) for x in xs]
        free_spots = [(x, y) for x, y in spots if free(x, y, width)] or spots[:1]
        # the nearest free spot that is clearly this point's, else the free spot most clearly so
        lx, ly = next(((x, y) for x, y in free_spots if clearance(i, x, y, width) > 2.25),
                      max(free_spots, key=lambda p: clearance(i, p[0], p[1], width)))
        placed.append((lx, ly, width))
        moved = abs(ly - py) > 0.05 or clearance(i, lx, ly, width) <= 2.25
        ax.annotate(names[i], xy=(px, py), xycoords="axes fraction", xytext=(lx, ly), textcoords="axes fraction",
                    fontsize=7.5, va="bottom",
                    arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.6} if moved else None)
