"""Tables (Markdown and HTML renderings, the papers' shapes) and figures (Pareto frontier, PNGs)."""

from __future__ import annotations

from hypothesis import given, strategies as st
from PIL import Image

from safemerge.report import load_results, pareto_frontier
from safemerge.report.figures import knowledge_safety_figure, knowledge_safety_points, l2_figure
from safemerge.report.tables import Cell, Table, format_params, pct, html_table, main_table, markdown_table, \
    safety_data_table, weighting_table


# ---- Pareto frontier -------------------------------------------------------------------------------------

def test_pareto_frontier_of_a_known_set():
    pts = [(0.3, 0.95), (0.75, 0.9), (0.76, 0.6), (0.7, 0.55), (0.5, 0.9), (0.75, 0.9)]
    # (0.7, .55) is beaten by (.76, .6); (.5, .9) by (.75, .9); the two equal points are both kept
    assert pareto_frontier(pts) == [0, 1, 5, 2]
    assert pareto_frontier([]) == [] and pareto_frontier([(1, 1)]) == [0]


def dominates(q, p) -> bool:
    return q[0] >= p[0] and q[1] >= p[1] and q != p


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=25))
def test_pareto_frontier_is_exactly_the_undominated_points(pts):
    front = set(pareto_frontier(pts))
    for i, p in enumerate(pts):
        assert (i in front) == (not any(dominates(q, p) for q in pts))
    xs = [pts[i][0] for i in pareto_frontier(pts)]
    assert xs == sorted(xs)


# ---- tables -------------------------------------------------------------------------------------------

def test_markdown_table_escapes_bolds_and_aligns():
    t = Table("T", ["name", "score"], [[Cell("a|b"), Cell("1.0", bold=True, numeric=True)],
                                       [Cell("c"), Cell("—", numeric=True)]], "a note", [False, True])
    assert markdown_table(t) == ("**T**\n\n| name | score |\n|---|---:|\n| a\\|b | **1.0** |\n| c | — |\n\n"
                                 "*a note*\n")


def test_html_table_escapes_and_groups_headers():
    t = Table("<T>", ["m", "x"], [[Cell("<b>"), Cell("2", bold=True, numeric=True)]], "", [False, True],
              [("", 1), ("safety (%)", 1)])
    out = html_table(t)
    assert "<caption>&lt;T&gt;</caption>" in out and "<td>&lt;b&gt;</td>" in out
    assert '<td class="num"><strong>2</strong></td>' in out and 'colspan="1" class="group">safety (%)' in out


def test_main_table_has_every_model_task_and_set_in_percent(full):
    full["models"]["ties-grid"]["domain"].pop("domain-finance_test")
    t = main_table(load_results(full))
    assert t.columns == ["model", "method", "medicine", "finance", "knowledge", "general", "safety_test",
                         "advbench_like", "safety"]
    rows = {r[0].text: [c.text for c in r] for r in t.rows}
    assert len(rows) == len(full["models"]) and list(rows)[:4] == ["base", "aligned", "expert-medicine",
                                                                    "expert-finance"]
    assert rows["mergealign"][2:5] == ["78.0", "72.0", "75.0"]
    assert rows["ties-grid"][3] == "—" and rows["ties-grid"][4] == "74.0"   # knowledge of what was measured
    best = {r[0].text for r in t.rows if r[2].bold}
    assert best == {"expert-medicine"}
    assert not any(r[5].bold for r in t.rows)        # every general score equal: nothing singled out
    for name, general in (("base", 0.9004), ("aligned", 0.9001)):  # shown alike (90.0): both bold, not one
        full["models"][name]["general"] = general
    assert {r[0].text for r in main_table(load_results(full)).rows if r[5].bold} == {"base", "aligned"}


def test_knowledge_column_follows_the_primary_domain(full):
    full["meta"]["primary_domain"] = "medicine"            # knowledge = the medicine column: not repeated
    assert main_table(load_results(full)).columns[2:5] == ["medicine", "finance", "general"]
    full["models"]["dpo"]["domain"]["medicine-hard"] = 0.5   # a second medicine task: the mean is new
    t = main_table(load_results(full))
    assert t.columns[2:6] == ["domain-medicine_test", "medicine-hard", "finance", "knowledge (medicine)"]
    assert {r[0].text: r[5].text for r in t.rows}["dpo"] == pct((0.74 + 0.5) / 2)


def test_weighting_table_shows_the_weights(full):
    t = weighting_table(load_results(full))
    weights = {r[0].text: r[2].text for r in t.rows}
    assert weights["mergealign-a1-b0.5"] == "α=1, β=0.5"
    assert weights["slerp-gradient"] == "t=[0, 0.5, 1, 0.5, 0]"
    assert set(weights) == {"mergealign", "mergealign-a1-b0.5", "mergealign-a0.5-b1", "slerp-gradient",
                            "slerp-0.7-0.3"}


def test_safety_data_table_marks_safety_awareness_and_lambda(full):
    t = safety_data_table(load_results(full))
    rows = {r[0].text: (r[2].text, r[3].text) for r in t.rows}
    assert rows == {"evomm-safe": ("yes", "0.5"), "evomm-unsafe": ("no", "0"), "cocktail-safe": ("yes", "0.5"),
                    "cocktail-unsafe": ("no", "0")}


def test_optional_tables_are_absent_without_their_models():
    res = load_results({"models": {"base": {"method": "pretrained", "safety": {"s": 0.1}}}})
    assert weighting_table(res) is None and safety_data_table(res) is None


def test_format_params():
    assert format_params({"lambda": 0.25, "t": [0, 0.5], "x": {"a": 1}}) == 'λ=0.25, t=[0, 0.5], x={"a":1}'
    assert format_params({}) == "—"


# ---- figures ------------------------------------------------------------------------------------------

def test_figures_are_pngs_of_every_point(full, full_report):
    assert set(knowledge_safety_points(load_results(full))) == set(full["models"])
    assert set(full_report["figures"]) == {"knowledge_safety", "l2"}
    for path in full_report["figures"].values():      # drawn by knowledge_safety_figure and l2_figure
        img = Image.open(path)
        assert img.format == "PNG" and img.width > 500 and img.height > 250


def test_figures_are_none_without_data():
    res = load_results({"models": {"base": {"method": "pretrained", "safety": {"s": 0.1}}}})
    assert knowledge_safety_figure(res) is None and l2_figure(res) is None


def test_each_label_reads_as_its_own_points(monkeypatch):
    """QA (a new user's compare): with the expert at (100, 0), Slerp at (97.5, 0) and TIES at (92.5, 2.5), the label
    "expert-medicine" sat by the TIES point and "slerp" on the expert's marker, with no leader lines."""
    from safemerge.report import figures

    models = {"base": ("pretrained", 0.0, 0.275), "aligned": ("aligned", 1.0, 0.325),
              "expert-medicine": ("expert", 0.0, 1.0), "mergealign": ("mergealign", 1.0, 0.975),
              "ties": ("ties", 0.025, 0.925), "slerp": ("slerp", 0.0, 0.975)}
    res = load_results({"meta": {"domains": ["medicine"]},
                        "models": {n: {"method": m, "safety": {"safety_test": s}, "domain": {"medicine": k}}
                                   for n, (m, s, k) in models.items()}})
    seen = {}
    real = figures._label_points

    def spy(ax, names, xy):
        real(ax, names, xy)
        seen.update(ax=ax, names=names, xy=xy)

    monkeypatch.setattr(figures, "_label_points", spy)
    assert knowledge_safety_figure(res) is not None
    ax, names = seen["ax"], seen["names"]
    to_axes = ax.transData + ax.transAxes.inverted()
    points = [to_axes.transform(p) for p in seen["xy"]]
    for text in ax.texts:
        i = names.index(text.get_text())
        if text.arrow_patch is not None:  # a leader line ties it to its point
            continue
        (lx, ly), w = text.get_position(), 0.0105 * len(names[i])

        def gap(q):  # from a marker to the label's box
            return max(lx - q[0], 0.0, q[0] - lx - w) ** 2 + max(ly - q[1], 0.0, q[1] - ly - 0.02) ** 2
        near = min(range(len(points)), key=lambda j: gap(points[j]))
        assert near == i, f"{names[i]!r} sits nearest {names[near]!r}"
