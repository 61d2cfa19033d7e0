"""The "2-D toys" section: MeanFlow at 1 NFE against flow matching at 1 and 100 steps, the same network and budget,
on each toy preset. Flow matching is the same preset trained with objective.ratio_r_neq_t = 0; both runs are
evaluated by meanflow.toy_eval.evaluate_toy (sliced Wasserstein SW2 and energy distance to fresh data draws, and
the data-vs-data floor at the same n).
"""

import math
import os

from meanflow.ablation.grid import Run
from meanflow.ablation.report import comment_block
from meanflow.ablation.runner import fmt_seconds

TOY_PRESETS = ("toy-checkerboard", "toy-8gaussians", "toy-moons", "toy-gaussian")
TOY_STEPS = (1, 100)
FLOW_MATCHING = {"objective.ratio_r_neq_t": 0.0}


def toy_runs(budget) -> list:
    """[(preset, MeanFlow run, flow-matching run)]: the preset as it is, and the preset with r = t everywhere."""
    out = []
    for preset in TOY_PRESETS:
        name = preset.removeprefix("toy-")
        mf = Run("toy", preset, dict(budget), f"{name}-meanflow", TOY_STEPS, [f"{preset}: MeanFlow"])
        fm = Run("toy", preset, {**budget, **FLOW_MATCHING}, f"{name}-flow-matching", TOY_STEPS,
                 [f"{preset}: flow matching"])
        out.append((preset, mf, fm))
    return out


def _value(entry, key):
    if entry is None or entry.get("result") is None:
        return None
    result = entry["result"]
    if "diverged" in (result.get("status"), entry["trained"].get("status")):
        return math.inf
    return (result.get("metrics") or {}).get(key)


def _num(v) -> str:
    if v is None:
        return "-"
    return "diverged" if v == math.inf else f"{v:.4f}"


def toy_table(triples, results, metric) -> list:
    lines = ["| toy | MeanFlow, 1 step | flow matching, 1 step | flow matching, 100 steps | MeanFlow, 100 steps | "
             "data vs data (floor) |", "|---|---:|---:|---:|---:|---:|"]
    for preset, mf, fm in triples:
        a, b = results.get(mf.key), results.get(fm.key)
        cells = [_value(a, f"{metric}_1nfe"), _value(b, f"{metric}_1nfe"), _value(b, f"{metric}_100nfe"),
                 _value(a, f"{metric}_100nfe"), _value(a, f"{metric}_floor")]
        lines.append(f"| {preset} | " + " | ".join(_num(v) for v in cells) + " |")
    return lines


def toy_sentence(triples, results) -> str:
    """How MeanFlow's one step compares with flow matching's one and hundred steps, from the SW2 numbers."""
    beats_one, near_hundred, counted = 0, 0, 0
    for _, mf, fm in triples:
        mf1, fm1, fm100 = (_value(results.get(mf.key), "swd_1nfe"), _value(results.get(fm.key), "swd_1nfe"),
                           _value(results.get(fm.key), "swd_100nfe"))
        if None in (mf1, fm1, fm100):
            continue
        counted += 1
        beats_one += mf1 < fm1
        near_hundred += mf1 <= 2 * fm100
    if not counted:
        return "No toy results yet."
    return (f"By SW2, MeanFlow's single step is closer to the data than flow matching's single step on {beats_one} of "
            f"{counted} toys, and within twice flow matching's 100-step distance on {near_hundred} of {counted}.")


def toy_section(triples, results, budget, figures, comments, missing=None) -> list:
    """The markdown of the section; `missing` says why it could not run (then it says only that)."""
    lines = ["## 2-D toys: MeanFlow 1-NFE against flow matching", ""]
    if missing:
        return lines + [f"Not run: {missing}. `python -m meanflow.experiments toys` fills this section.", ""]
    if budget.get("steps") is None:
        steps = "each preset's own train.steps"
    else:
        steps = f"{budget['steps']} steps each"
    lines += [f"Each toy preset trained twice with the same MLP and budget ({steps}), as MeanFlow (the preset) and "
              "as flow matching (ratio of r != t = 0); distances to fresh draws of the data at n = "
              f"{budget['n']} samples, lower is better; the floor is two independent data draws.", "",
              "Sliced Wasserstein distance (SW2):", ""] + toy_table(triples, results, "swd")
    lines += ["", "Energy distance:", ""] + toy_table(triples, results, "energy")
    times = [e["trained"]["seconds"] + e["result"]["seconds"] for e in results.values() if e.get("result")]
    lines += ["", toy_sentence(triples, results) + f" Wall time of the toy runs: {fmt_seconds(sum(times))}.", ""]
    lines += comment_block("toys", comments) + [""]
    for preset, path in figures.items():
        if path:
            lines += [f"![{preset}: data, MeanFlow and flow matching samples]({path})", ""]
    return lines


def toy_figure(path, preset, mf_dir, fm_dir, n):
    """Data, MeanFlow 1 step, flow matching 1 and 100 steps, from the same noise."""
    from meanflow.ablation.figures import toy_samples, toy_scatter
    from meanflow.config import resolve_config
    from meanflow.data.toy import toy_points

    cfg = resolve_config(["--config", preset])
    panels = [("data", toy_points(cfg.data.toy, n, (cfg.data.toy_seed, cfg.train.seed, 2)) * cfg.data.scale)]
    for caption, run_dir, steps in (("MeanFlow, 1 step", mf_dir, 1), ("flow matching, 1 step", fm_dir, 1),
                                    ("flow matching, 100 steps", fm_dir, 100)):
        points = toy_samples(run_dir, steps, n) if os.path.isdir(os.path.join(run_dir, "checkpoints")) else None
        panels.append((caption, points))
    toy_scatter(path, preset, panels)
