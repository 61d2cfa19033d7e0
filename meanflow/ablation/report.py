"""docs/ablations.md from the grid's cached results: one table per ablation (our FID, class accuracy, the paper's
FID, wall times), whether our order of settings matches the paper's (meanflow.ablation.compare), a sentence written
from the numbers, the figures, and a comment block per table that a regeneration keeps.

Cells: a row reads its run's result record (meanflow.ablation.runner): metrics fid_{k}nfe, accuracy_{k}nfe,
real_vs_real_floor, classifier_test_accuracy; a key the evaluator did not produce prints "-", a run not run yet
"not run", a diverged one "diverged" (ranked last).
"""

import math
import re
from dataclasses import dataclass

from meanflow.ablation.compare import compare_orders
from meanflow.ablation.grid import ABLATIONS, PAPER_SOURCE
from meanflow.ablation.runner import fmt_seconds

NO_COMMENT = "_No comment yet: whoever runs the grid for real writes one here; regenerating the doc keeps it._"
_COMMENT = re.compile(r"<!-- comment:([\w-]+) -->\n(.*?)\n<!-- /comment -->", re.S)


@dataclass
class Row:
    label: str
    nfe: int
    status: str  # "done", "diverged", "not run"
    fid: float | None  # at nfe; math.inf when diverged
    fid2: float | None  # at 2 NFE
    accuracy: float | None  # class accuracy of the classifier on our samples at nfe
    paper: float | None
    train_s: float | None
    eval_s: float | None
    resumed: bool = False


def rows_for(ablation, cells, results) -> list:
    rows = []
    for s in ablation.settings:
        entry = results.get(cells[(ablation.key, s.label)].key)
        trained, result = (entry or {}).get("trained"), (entry or {}).get("result")
        metrics = (result or {}).get("metrics") or {}
        if trained is None or result is None:
            status = "not run"
        elif "diverged" in (trained["status"], result["status"]):
            status = "diverged"
        else:
            status = "done"
        fid = math.inf if status == "diverged" else metrics.get(f"fid_{s.nfe}nfe")
        rows.append(Row(s.label, s.nfe, status, fid, metrics.get("fid_2nfe"), metrics.get(f"accuracy_{s.nfe}nfe"),
                        s.paper_fid, (trained or {}).get("seconds"), (result or {}).get("seconds"),
                        bool((trained or {}).get("resumed_from_step"))))
    return rows


def _fid(v, status="done") -> str:
    if status == "diverged":
        return "diverged"
    if status == "not run":
        return "not run"
    if v == math.inf:
        return "diverged"
    return "-" if v is None else f"{v:.2f}"


def _pct(v) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if v <= 1 else f"{v:.1f}%"  # a fraction, or already a percentage


def table(ablation, rows) -> list:
    """The markdown table of one ablation: rows in the paper's order. Tables whose rows are all 1-NFE show 2-NFE
    beside it; the others (flow matching at 1 and 50 steps) show each row's step count instead."""
    one_nfe = all(r.nfe == 1 for r in rows)
    two = one_nfe and any(r.fid2 is not None for r in rows)  # evaluated at 2 NFE (--nfe 1,2)
    head = ["setting"] + (["FID 1-NFE"] + (["FID 2-NFE"] if two else []) if one_nfe else ["NFE", "FID"])
    head += ["class accuracy", f"paper FID 1-NFE (Table {ablation.paper_table})", "train", "eval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r.label] + ([_fid(r.fid, r.status)] + ([_fid(r.fid2, r.status)] if two else []) if one_nfe
                             else [str(r.nfe), _fid(r.fid, r.status)])
        train = fmt_seconds(r.train_s) + (" (resumed)" if r.resumed else "")
        cells += [_pct(r.accuracy), "-" if r.paper is None else f"{r.paper:.2f}", train, fmt_seconds(r.eval_s)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def direction_of(rows):
    return compare_orders({r.label: r.fid for r in rows}, {r.label: r.paper for r in rows})


def _order(labels, values) -> str:
    return " < ".join(f"{k} ({_fid(values[k])})" if values[k] != math.inf else f"{k} (diverged)" for k in labels)


def sentence(rows, d, floor, n) -> str:
    """What the numbers say, in words; written from them, so it is true of whatever the grid produced."""
    done = [r for r in rows if r.status != "not run" and r.fid is not None]
    if not done:
        return "No results yet: run `make ablations`."
    ours = {r.label: r.fid for r in rows}
    if d.verdict == "n/a":
        if d.compared >= 2:  # enough numbers, but ours all tie (every run diverged, say)
            return f"Ours all tie ({', '.join(d.order_ours)}: {_fid(ours[d.order_ours[0]])}): no order to compare."
        return (f"{len(done)} setting(s) with a result: too few with both numbers to compare orders with the "
                "paper's.")
    paper = {r.label: r.paper for r in rows}
    same = "the same best setting" if set(d.best_ours) & set(d.best_paper) else "a different best setting"
    words = {"yes": "the direction matches", "partly": "the direction matches in part", "no": "it does not match"}
    text = (f"Ours, best first: {_order(d.order_ours, ours)}; the paper's: {_order(d.order_paper, paper)}. "
            f"{same.capitalize()} and Spearman rho = {d.rho:.2f} over {d.compared} settings: {words[d.verdict]}.")
    finite = [r.fid for r in done if r.fid != math.inf]
    if len(finite) > 1 and floor is not None:
        spread = max(finite) - min(finite)
        text += (f" Our best-to-worst spread is {spread:.1f} FID; for scale, two sets of {n} real digits are "
                 f"{floor:.1f} apart (the real-vs-real floor)")
        text += ": a spread below that says little about the order." if spread < floor else "."
    diverged = [r.label for r in rows if r.status == "diverged"]
    if diverged:
        text += f" Diverged (non-finite loss or samples, ranked last): {', '.join(diverged)}."
    return text


def read_comments(path) -> dict:
    """{table key: the comment text} of an existing doc, so that regenerating it keeps what a person wrote."""
    try:
        with open(path) as f:
            return {k: v for k, v in _COMMENT.findall(f.read())}
    except OSError:
        return {}


def comment_block(key, comments) -> list:
    return [f"<!-- comment:{key} -->", comments.get(key, NO_COMMENT), "<!-- /comment -->"]


def _image_row(images) -> list:
    """A one-row markdown table of (caption, relative path or None) images."""
    if not any(p for _, p in images):
        return []
    return ["| " + " | ".join(c for c, _ in images) + " |", "|" + "|".join(":---:" for _ in images) + "|",
            "| " + " | ".join(f"![{c}]({p})" if p else "-" for c, p in images) + " |"]


def ablation_section(ablation, rows, figures, comments, floor, n) -> list:
    """figures: {"chart": relative path or None, "samples": {label: relative path or None}}."""
    d = direction_of(rows)
    best = f"best: ours {', '.join(d.best_ours) or '-'}, paper {', '.join(d.best_paper) or '-'}"
    rho = "-" if d.rho is None else f"{d.rho:.2f}"
    lines = [f"## {ablation.title} (paper Table {ablation.paper_table})", "", ablation.note, ""]
    lines += table(ablation, rows)
    lines += ["", f"**Direction matches?** {d.verdict} ({best}; Spearman rho = {rho}, {d.compared} settings "
                  "compared)", "", sentence(rows, d, floor, n), ""]
    lines += comment_block(ablation.key, comments) + [""]
    if figures.get("chart"):
        lines += [f"![{ablation.title}: our FID and the paper's]({figures['chart']})", ""]
    samples = _image_row([(r.label if r.nfe == 1 else f"{r.label}", figures.get("samples", {}).get(r.label))
                          for r in rows])
    if samples:
        lines += ["1-NFE samples (EMA weights, one row per class, the same noise for every setting; the 50-step "
                  "grid where a row says so):", ""] + samples + [""]
    return lines


def budget_section(budget, machines, total_s) -> list:
    lines = ["## Budget and machine", "",
             "Every run has the same budget and differs from the others only in the objective settings named.", "",
             "| | |", "|---|---|",
             f"| base preset | `{budget['base']}` |", f"| model | {budget['model']} |",
             f"| training | {budget['steps']} steps at global batch {budget['batch']}, seed {budget['seed']}, "
             f"one process per run (no torchrun: the runs are small) |",
             f"| the paper's default, shared by the tables | {budget['default']} |",
             f"| evaluation | FID at n = {budget['n']} samples against the run's own training digits, "
             f"{budget['eval_steps']} |"]
    for key, label in (("floor", "real-vs-real FID floor at this n"), ("classifier", "classifier's test accuracy")):
        if budget.get(key) is not None:
            value = _pct(budget[key]) if key == "classifier" else f"{budget[key]:.2f}"
            lines.append(f"| {label} | {value} |")
    for m in machines or [{}]:
        lines.append(f"| machine | {m.get('cpu', '-')}, {m.get('cores', '-')} logical cores, torch "
                     f"{m.get('torch', '-')}, Python {m.get('python', '-')}"
                     + (f", GPU {m['cuda']}" if m.get("cuda") else "") + " |")
    lines += [f"| wall time of the runs (train + eval) | {fmt_seconds(total_s)} |", ""]
    return lines


def render(*, budget, machines, total_s, ablation_rows, figures, comments, toy_lines, generated) -> str:
    """The whole doc. ablation_rows: {key: [Row]}; figures: {key: {"chart", "samples"}}; toy_lines: markdown."""
    floor, n = budget.get("floor"), budget["n"]
    lines = ["# Ablations: the MeanFlow paper's Table 1 at small scale", "",
             f"Generated by `python -m meanflow.experiments ablations` ({generated}); `make ablations` reruns it. "
             "The runs are cached in the output folder (default `runs/ablations`), so a rerun only trains what is "
             "missing. Our FIDs are MNIST FIDs of short CPU runs: compare the order of the settings with the "
             "paper's, never the values.", ""]
    lines += budget_section(budget, machines, total_s)
    for ablation in ABLATIONS:
        lines += ablation_section(ablation, ablation_rows[ablation.key], figures.get(ablation.key, {}), comments,
                                  floor, n)
    lines += toy_lines
    lines += ["## The paper's numbers", "", PAPER_SOURCE, "",
              "\"Direction matches?\" compares orders, not values: **yes** when the best setting is the same and "
              "Spearman's rank correlation is at least 0.5, **partly** when one of the two holds, **no** otherwise "
              "(a diverged run ranks last; settings without a paper number are left out).", ""]
    return "\n".join(lines)
