"""Does our ablation point the same way as the paper's? Compare the ORDER of settings by FID, not the values (ours
are MNIST FIDs of minutes-long CPU runs, the paper's ImageNet FIDs of 80-epoch DiT-B/4 runs).

Two measures over the settings that have both numbers: whether the best (lowest FID) setting is the same, and
Spearman's rank correlation (average ranks for ties; a diverged run is +inf, the worst). The verdict:

    yes      the same best setting and rho >= 0.5
    partly   one of the two
    no       neither
    n/a      fewer than two settings with both numbers, or all of ours tie
"""

import math
from dataclasses import dataclass, field

RHO_AGREES = 0.5


@dataclass
class Direction:
    verdict: str
    best_ours: list = field(default_factory=list)  # the labels at our lowest FID (more than one on a tie)
    best_paper: list = field(default_factory=list)
    rho: float | None = None
    order_ours: list = field(default_factory=list)  # labels, best first
    order_paper: list = field(default_factory=list)
    compared: int = 0


def average_ranks(values) -> list:
    """Ranks 1..n of values, lowest first; tied values share their mean rank (inf ties with inf)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a, b) -> float | None:
    """Spearman's rho of two equal-length sequences; None when either has no spread (all tied) or n < 2."""
    if len(a) != len(b) or len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


def compare_orders(ours: dict, paper: dict) -> Direction:
    """ours, paper: {label: FID or None (no number)}; ours may hold math.inf (diverged)."""
    labels = [k for k in ours if ours[k] is not None and paper.get(k) is not None]
    a, b = [float(ours[k]) for k in labels], [float(paper[k]) for k in labels]
    d = Direction("n/a", compared=len(labels))
    if len(labels) < 2:
        return d
    d.order_ours = [labels[i] for i in sorted(range(len(labels)), key=lambda i: a[i])]
    d.order_paper = [labels[i] for i in sorted(range(len(labels)), key=lambda i: b[i])]
    d.best_ours = [k for k, v in zip(labels, a) if v == min(a)]
    d.best_paper = [k for k, v in zip(labels, b) if v == min(b)]
    d.rho = spearman(a, b)
    if d.rho is None:
        return d  # all of ours tie (every run diverged, say): no order to compare
    same_best = bool(set(d.best_ours) & set(d.best_paper))
    agrees = d.rho >= RHO_AGREES
    d.verdict = "yes" if same_best and agrees else "partly" if same_best or agrees else "no"
    return d
