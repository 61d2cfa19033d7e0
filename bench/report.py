"""pytest-benchmark JSON -> markdown, and the per-device tables of BENCHMARKS.md.

    python -m bench.report /tmp/bench.json                        # print the table
    python -m bench.report /tmp/bench.json --update BENCHMARKS.md # replace this device's table, refresh the goals

The headline of every table is a ratio against the reference measured in the same run (interleaved, for the
training step); absolute times and rates are printed for GPU runs only (a shared CPU's absolute speed says little).
Rates come from explicit formulas recorded by the suites: attention TFLOP/s = extra_info["flops"] / median time,
adaLN GB/s = extra_info["bytes"] / median time.
"""

import argparse
import json
import re
import statistics
import sys
from datetime import datetime
from pathlib import Path

MiB = 2**20
NOT_MEASURED_GPU = "not measured: no GPU was available"


# ----------------------------------------------------------------------------------------------------------------------
# reading a run
# ----------------------------------------------------------------------------------------------------------------------

def run_info(data):
    env = dict(data.get("machine_info", {}).get("meanflow", {}))
    commit = data.get("commit_info", {})
    env.setdefault("device", data.get("machine_info", {}).get("processor") or "unknown device")
    env.setdefault("device_kind", "cpu")
    env.setdefault("commit", (commit.get("id") or "")[:12])
    env.setdefault("dirty", commit.get("dirty", False))
    env["date"] = (data.get("datetime") or datetime.now().isoformat())[:10]
    return env


def _suite(data, name):
    return [b for b in data.get("benchmarks", []) if b.get("extra_info", {}).get("suite") == name]


def _groups(benches):
    groups = {}
    for b in benches:
        groups.setdefault(b["group"], {})[b["extra_info"]["impl"]] = b
    return groups


QUIET_SHARE = 0.9  # a round is quiet when every step in it got >= 90% of the best CPU share seen in the run
MIN_QUIET_ROUNDS = 3


def quiet_rounds(info):
    """Indices of the rounds the ratios use: on a CPU run, those in which no step lost its cores to other jobs
    (when at least MIN_QUIET_ROUNDS are); otherwise all of them."""
    engines = info["engines"]
    n = len(next(iter(engines.values()))["times_s"])
    shares = [v.get("cpu_share") for v in engines.values()]
    if any(s is None or None in s for s in shares):
        return list(range(n))
    top = max(max(s) for s in shares)
    quiet = [i for i in range(n) if all(s[i] >= QUIET_SHARE * top for s in shares)]
    return quiet if len(quiet) >= MIN_QUIET_ROUNDS else list(range(n))


def _paired(times, num, den):
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _ratio_pair(times, num, den):
    """times[num] / times[den] as (median of per-round ratios, ratio of the best rounds); (None, None) when either
    engine did not run (it failed, or the run left it out)."""
    if num not in times or den not in times:
        return None, None
    return _paired(times, num, den), min(times[num]) / min(times[den])


def train_step_ratios(info):
    """Per engine, over the quiet rounds: speedup over func (img/s ratio) and time over the flow-matching step, each
    as the median of per-round ratios and as the ratio of the best rounds; memory over func's. A ratio against an
    engine that did not run is None."""
    engines, used = info["engines"], quiet_rounds(info)
    times = {e: [v["times_s"][i] for i in used] for e, v in engines.items()}
    func_memory = engines["func"]["memory_bytes"] if "func" in engines else None
    out = {}
    for e, v in engines.items():
        speedup, speedup_best = _ratio_pair(times, "func", e)
        vs_fm, vs_fm_best = _ratio_pair(times, e, "flow matching")
        out[e] = {
            "speedup": speedup,
            "speedup_best": speedup_best,
            "vs_fm": vs_fm,
            "vs_fm_best": vs_fm_best,
            "memory_ratio": None if func_memory is None else v["memory_bytes"] / func_memory,
        }
    return out


# ----------------------------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------------------------

def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _train_step_section(bench, gpu):
    info = bench["extra_info"]["train_step"]
    ratios = train_step_ratios(info)
    head = (f"#### Training step: {info['model']} {info['overrides']}, batch {info['batch']}, {info['precision']}, "
            f"{info['rounds']} interleaved rounds")
    header = ["engine", "speedup vs func (img/s), median / best", "time vs flow matching, median / best",
              "memory (MiB)", "memory vs func"]
    if gpu:
        header += ["img/s", "median step (ms)"]
    rows = []
    for engine, v in info["engines"].items():
        r = ratios[engine]
        row = [engine, "-" if r["speedup"] is None else f"{r['speedup']:.2f}x / {r['speedup_best']:.2f}x",
               "-" if r["vs_fm"] is None else f"{r['vs_fm']:.2f}x / {r['vs_fm_best']:.2f}x",
               f"{v['memory_bytes'] / MiB:.1f}", "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"]
        if gpu:
            row += [f"{v['img_per_s']:.1f}", f"{v['median_s'] * 1e3:.1f}"]
        rows.append(row)
    failed = info.get("failed", {})
    rows += [[engine, "failed"] + ["-"] * (len(header) - 2) for engine in failed]
    n, used = info["rounds"], len(quiet_rounds(info))
    note = (f"memory: {info['memory_measure']}. median: the median over rounds of the per-round ratio; best: ratio "
            f"of each engine's fastest round.")
    for engine, why in failed.items():
        note += f" {engine} did not run: {why}."
    if any(v.get("cpu_share") for v in info["engines"].values()):
        note += (f" Ratios use {used} of {n} rounds: those in which every step got at least {QUIET_SHARE:.0%} of the "
                 f"best CPU share of the run (in the others, other jobs took the cores).")
    load = info.get("load")
    if load:
        note += (f" Machine load (1-min average) {load['before']:.1f} before, {load['after']:.1f} after, on "
                 f"{load['cores']} cores.")
    return "\n".join([head, "", _table(header, rows), "", note])


def _kernel_section(title, impls, ref, rate_key, rate_label, rate_scale, versus_label, versus, gpu):
    """One row per implementation: speedup over ``ref`` (same run), ``versus(b)`` against the floor/ceiling row,
    the rate from the explicit formula, and on GPU the median time."""
    t_ref = impls[ref]["stats"]["median"] if ref in impls else None  # None: the reference failed in this run
    header = ["implementation", f"speedup vs {ref}", versus_label, rate_label] + (["median (us)"] if gpu else [])
    rows = []
    for name, b in impls.items():
        t = b["stats"]["median"]
        comparable = t_ref is not None and b["extra_info"].get("tangent", True)  # a primal-only row is no speedup
        row = [name, f"{t_ref / t:.2f}x" if comparable else "-", versus(b), f"{_rate(b, rate_key) / rate_scale:.1f}"]
        rows.append(row + ([f"{t * 1e6:.1f}"] if gpu else []))
    return "\n".join([f"#### {title}", "", _table(header, rows)])


def _rate(b, key):
    return b["extra_info"][key] / b["stats"]["median"]


def render(data):
    """The markdown report of one pytest-benchmark JSON run."""
    env = run_info(data)
    gpu = env["device_kind"] == "gpu"
    dirty = " (uncommitted changes)" if env.get("dirty") else ""
    parts = [
        f"### {env['device']}, {env['date']}",
        "",
        f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + f", commit {env['commit']}{dirty}",
    ]
    for b in _suite(data, "train_step"):
        parts += ["", _train_step_section(b, gpu)]
    for group, impls in _groups(_suite(data, "attention")).items():
        info = next(iter(impls.values()))["extra_info"]
        floor = impls.get(info["floor"])
        versus = (lambda b: f"{b['stats']['median'] / floor['stats']['median']:.2f}x") if floor else (lambda b: "-")
        parts += ["", _kernel_section(f"{group} (B={info['shape']['B']}, H={info['shape']['H']}, bf16)", impls,
                                      info["reference"], "flops", "TFLOP/s (JVP = 3 x 4BHN^2D)", 1e12,
                                      f"time vs {info['floor']}", versus, gpu)]
    for group, impls in _groups(_suite(data, "adaln")).items():
        info = next(iter(impls.values()))["extra_info"]
        ceiling = impls.get(info["ceiling"])
        versus = (lambda b: f"{_rate(b, 'bytes') / _rate(ceiling, 'bytes'):.0%}") if ceiling else (lambda b: "-")
        parts += ["", _kernel_section(f"{group} (bf16)", impls, info["reference"], "bytes",
                                      "GB/s ((4BNC + 4BC) x 2 bytes)", 1e9, "share of copy bandwidth", versus, gpu)]
    if len(parts) == 3:
        parts += ["", "(no benchmark results in this run)"]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# goals
# ----------------------------------------------------------------------------------------------------------------------

def _train_goal(data, kind, model, engine, key, fmt):
    """(value, text) of a training-step goal; (None, why) when the run tried but an engine it compares failed."""
    if run_info(data)["device_kind"] != kind:
        return None
    for b in _suite(data, "train_step"):
        info = b["extra_info"]["train_step"]
        if model is not None and info["model"] != model:
            continue
        where = f" ({info['model']}, batch {info['batch']})"
        failed = info.get("failed", {})
        if engine in info["engines"]:
            value = train_step_ratios(info)[engine][key]
            if value is not None:
                return value, fmt.format(value) + where
        if failed:
            return None, "not measured: " + "; ".join(f"{e} failed ({why})" for e, why in failed.items()) + where
    return None


def _kernel_goal(data, suite, pick, fmt, worst):
    """Worst value over the groups that ``pick(extra_info)`` selects, as speed ratios computed by ``fmt``."""
    values = []
    for impls in _groups(_suite(data, suite)).values():
        info = next(iter(impls.values()))["extra_info"]
        if not pick(info):
            continue
        try:
            values.append(fmt(impls, info))
        except KeyError:  # an implementation this goal compares did not run (failed) in this run
            continue
    return (worst(values), None) if values else None


def _attn_speedup(impls, info):
    return impls[info["reference"]]["stats"]["median"] / impls[info["project"]]["stats"]["median"]


def _attn_vs_flash(impls, info):
    return impls[info["project"]]["stats"]["median"] / impls[info["floor"]]["stats"]["median"]


def _adaln_speedup(impls, info):
    return impls[info["reference"]]["stats"]["median"] / impls[info["project"]]["stats"]["median"]


def _adaln_bandwidth(impls, info):
    return _rate(impls[info["project"]], "bytes") / _rate(impls[info["ceiling"]], "bytes")


# (key, device kind, goal, target, measure(data) -> (value, text) or None, met(value))
GOALS = [
    ("cpu-step-vs-fm", "cpu", "CPU small DiT step: dual vs a flow-matching step (time)", "<= 1.40x",
     lambda d: _train_goal(d, "cpu", None, "dual", "vs_fm", "{:.2f}x"), lambda v: v <= 1.40),
    ("cpu-step-speed", "cpu", "CPU small DiT step: dual vs func (img/s)", ">= 1.3x",
     lambda d: _train_goal(d, "cpu", None, "dual", "speedup", "{:.2f}x"), lambda v: v >= 1.3),
    ("cpu-step-memory", "cpu", "CPU small DiT step: dual vs func (peak memory)", "<= 0.45x",
     lambda d: _train_goal(d, "cpu", None, "dual", "memory_ratio", "{:.2f}x"), lambda v: v <= 0.45),
    ("gpu-step-speed", "gpu", "GPU DiT-B/2 batch 64 bf16: dual+kernels vs func (img/s)", ">= 2x",
     lambda d: _train_goal(d, "gpu", "DiT-B/2", "dual+kernels", "speedup", "{:.2f}x"), lambda v: v >= 2.0),
    ("gpu-step-memory", "gpu", "GPU DiT-B/2 batch 64 bf16: dual+kernels vs func (peak memory)", "<= 0.6x",
     lambda d: _train_goal(d, "gpu", "DiT-B/2", "dual+kernels", "memory_ratio", "{:.2f}x"), lambda v: v <= 0.6),
    ("gpu-step-vs-fm", "gpu", "GPU DiT-B/2 batch 64 bf16: dual+kernels vs a flow-matching step (time)", "<= 1.5x",
     lambda d: _train_goal(d, "gpu", "DiT-B/2", "dual+kernels", "vs_fm", "{:.2f}x"), lambda v: v <= 1.5),
    ("gpu-attn-256", "gpu", "attention_jvp vs func.jvp(SDPA MATH), N=256 (worst D)", ">= 5x",
     lambda d: _kernel_goal(d, "attention", lambda i: i["shape"]["N"] == 256, _attn_speedup, min),
     lambda v: v >= 5),
    ("gpu-attn-4096", "gpu", "attention_jvp vs func.jvp(SDPA MATH), N=4096", ">= 15x",
     lambda d: _kernel_goal(d, "attention", lambda i: i["shape"]["N"] == 4096, _attn_speedup, min),
     lambda v: v >= 15),
    ("gpu-attn-flash", "gpu", "attention_jvp time vs SDPA flash forward, N >= 1024 (worst)", "<= 2.2x",
     lambda d: _kernel_goal(d, "attention", lambda i: i["shape"]["N"] >= 1024, _attn_vs_flash, max),
     lambda v: v <= 2.2),
    ("gpu-adaln-bw", "gpu", "adaLN dual kernel bandwidth vs copy (worst shape)", ">= 70%",
     lambda d: _kernel_goal(d, "adaln", lambda i: True, _adaln_bandwidth, min), lambda v: v >= 0.70),
    ("gpu-adaln-speed", "gpu", "adaLN dual kernel vs the torch composite (worst shape)", ">= 3x",
     lambda d: _kernel_goal(d, "adaln", lambda i: True, _adaln_speedup, min), lambda v: v >= 3),
]


def measure_goals(data):
    """{goal key: {"value", "met", "device", "date"}} for the goals this run measured."""
    env = run_info(data)
    out = {}
    for key, _kind, _goal, _target, measure, met in GOALS:
        got = measure(data)
        if got is None:
            continue
        value, text = got
        if text is None:
            text = f"{value:.0%}" if key == "gpu-adaln-bw" else f"{value:.2f}x"
        met_value = None if value is None else bool(met(value))  # None: tried, but not measurable in this run
        out[key] = {"value": text, "met": met_value, "device": env["device"], "date": env["date"]}
    return out


def goals_table(measured):
    rows = []
    for key, kind, goal, target, _measure, _met in GOALS:
        m = measured.get(key)
        if m is None:
            missing = NOT_MEASURED_GPU if kind == "gpu" else "not measured yet"
            rows.append([goal, target, missing, "-", "-"])
        else:
            met = "-" if m["met"] is None else "yes" if m["met"] else "**no**"
            rows.append([goal, target, m["value"], met, f"{m['device']}, {m['date']}"])
    return _table(["goal", "target", "measured", "met", "device, date"], rows)


# ----------------------------------------------------------------------------------------------------------------------
# BENCHMARKS.md
# ----------------------------------------------------------------------------------------------------------------------

HEADER = """# Benchmarks

Run `pytest bench/ --benchmark --benchmark-json=/tmp/bench.json`, then
`python -m bench.report /tmp/bench.json --update BENCHMARKS.md`: this keeps the latest table per device and the
measured column of the goals below. Every ratio is measured against its reference in the same run; absolute times are
printed for GPU runs only. Suites and formulas: see the docstrings in bench/. On a GPU machine, `make gpu-check`
writes such a JSON (quick rounds) as `runs/gpu-check/bench.json`.
"""
GOAL_NOTES = """\
The CPU targets replace the Benchmarks issue's ">= 1.5x func img/s, <= 0.7x memory": a MeanFlow step adds one
forward's worth of matmuls to a flow-matching step, so 4/3 of it is the floor and 1.5x over func is out of reach at
64 tokens (DESIGN.md, "The one-pass dual JVP"). "median" ratios are medians of per-round ratios of interleaved steps.
CPU memory is the bytes autograd saves for backward (the activations a step keeps); GPU memory is CUDA's max
allocated during the step above what was allocated before it."""
_GOALS_DATA = re.compile(r"<!-- goals-data: (.*?) -->", re.S)
_SECTION = re.compile(r"<!-- device: (.*?) -->\n(.*?)<!-- /device -->\n", re.S)


def update_markdown(text, data):
    """BENCHMARKS.md with this run's device section replaced (or added) and the goals table refreshed."""
    found = _GOALS_DATA.search(text or "")
    measured = json.loads(found.group(1)) if found else {}
    measured.update(measure_goals(data))
    sections = {m.group(1): m.group(2) for m in _SECTION.finditer(text or "")}
    sections[run_info(data)["device"]] = render(data) + "\n"
    out = [HEADER, "## Goals", "", goals_table(measured), "", GOAL_NOTES, "",
           f"<!-- goals-data: {json.dumps(measured, sort_keys=True)} -->", "", "## Latest results per device", ""]
    for device, body in sections.items():
        out += [f"<!-- device: {device} -->", body.rstrip("\n"), "<!-- /device -->", ""]
    if not any(m.get("device") for k, m in measured.items() if k.startswith("gpu")):
        out += ["### GPU", "", NOT_MEASURED_GPU + ".", ""]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json=FILE)")
    parser.add_argument("--update", metavar="MARKDOWN", help="update this BENCHMARKS.md in place")
    args = parser.parse_args(argv)
    data = json.loads(Path(args.json).read_text())
    if args.update:
        path = Path(args.update)
        path.write_text(update_markdown(path.read_text() if path.exists() else "", data))
        print(f"updated {path}")
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
