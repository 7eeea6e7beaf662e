"""Choose one format per tensor: the least total predicted loss within a size budget.

A multiple-choice knapsack: tensor t takes one option o with cost[t][o] (predicted loss) and
size[t][o] (bytes). Solved by Lagrangian relaxation (each tensor independently minimises
cost + lam * size; lam found by bisection so that the total size just fits), then a greedy pass
spends what budget is left on the upgrades with the best loss saved per byte. The relaxation's
choice is optimal for the size it uses (Everett 1963); the greedy pass closes most of the gap to
the budget.
"""
from __future__ import annotations

import math


def _pick(cost: dict[str, float], size: dict[str, int], lam: float) -> str:
    return min(cost, key=lambda o: (cost[o] + lam * size[o], size[o]))


def allocate(costs: list[dict[str, float]], sizes: list[dict[str, int]], budget: float) -> list[str]:
    """One option per tensor, total size <= budget, least total cost found; ValueError if even
    the smallest options do not fit."""
    if len(costs) != len(sizes) or any(set(c) != set(s) or not c for c, s in zip(costs, sizes)):
        raise ValueError("costs and sizes must name the same, non-empty options for every tensor")
    smallest = sum(min(s.values()) for s in sizes)
    if smallest > budget:
        raise ValueError(f"the budget ({budget:.0f} bytes) is below the smallest choice ({smallest} bytes)")

    def total(lam: float) -> tuple[list[str], int]:
        pick = [_pick(c, s, lam) for c, s in zip(costs, sizes)]
        return pick, sum(s[o] for s, o in zip(sizes, pick))

    pick, used = total(0.0)
    if used > budget:
        hi = 1e-30
        while total(hi)[1] > budget:  # ends: a large enough lam picks every tensor's smallest option
            hi *= 10
        lo = hi / 10 if hi > 1e-30 else 0.0
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(mid)[1] > budget else (lo, mid)
        pick, used = total(hi)
    return _fill(costs, sizes, pick, budget - used)


def _fill(costs: list[dict[str, float]], sizes: list[dict[str, int]], pick: list[str], left: float) -> list[str]:
    """Greedy upgrades that fit what is left: best cost saved per extra byte first."""
    pick = list(pick)
    while True:
        best, best_rate = None, 0.0
        for t, (c, s) in enumerate(zip(costs, sizes)):
            cur = pick[t]
            for o in c:
                extra, saved = s[o] - s[cur], c[cur] - c[o]
                if saved <= 0 or extra > left:
                    continue
                rate = saved / extra if extra > 0 else math.inf
                if rate > best_rate:
                    best, best_rate = (t, o), rate
        if best is None:
            return pick
        t, o = best
        left -= sizes[t][o] - sizes[t][pick[t]]
        pick[t] = o
