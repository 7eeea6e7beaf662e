import itertools
import random

import pytest

from modelpress.core.allocate import allocate


def brute_force(costs, sizes, budget):
    best = None
    for pick in itertools.product(*[list(c) for c in costs]):
        size = sum(s[o] for s, o in zip(sizes, pick))
        cost = sum(c[o] for c, o in zip(costs, pick))
        if size <= budget and (best is None or cost < best[0]):
            best = (cost, pick)
    return best


def instance(rng, tensors):
    costs, sizes = [], []
    for _ in range(tensors):
        n = rng.randint(100, 2000)  # weights; loss falls about 4x per extra bit, with noise
        opts = rng.sample([2, 3, 4, 5, 6, 8], 4)
        sizes.append({f"b{b}": n * b for b in opts})
        scale = rng.uniform(0.1, 10)
        costs.append({f"b{b}": scale * n * 4.0 ** -b * rng.uniform(0.7, 1.3) for b in opts})
    return costs, sizes


@pytest.mark.parametrize("seed", range(20))
def test_within_budget_and_close_to_the_optimum(seed):
    rng = random.Random(seed)
    costs, sizes = instance(rng, 5)
    lo = sum(min(s.values()) for s in sizes)
    hi = sum(max(s.values()) for s in sizes)
    budget = rng.uniform(lo, hi)
    pick = allocate(costs, sizes, budget)
    used = sum(s[o] for s, o in zip(sizes, pick))
    cost = sum(c[o] for c, o in zip(costs, pick))
    opt_cost, _ = brute_force(costs, sizes, budget)
    assert used <= budget
    # observed: equal to the optimum in 18 of 20 seeds, at most 1.23x it otherwise
    assert cost <= 1.5 * opt_cost + 1e-12


def test_optimal_on_most_instances():
    hits = 0
    for seed in range(100):
        rng = random.Random(1000 + seed)
        costs, sizes = instance(rng, 4)
        budget = rng.uniform(sum(min(s.values()) for s in sizes), sum(max(s.values()) for s in sizes))
        pick = allocate(costs, sizes, budget)
        hits += abs(sum(c[o] for c, o in zip(costs, pick)) - brute_force(costs, sizes, budget)[0]) < 1e-12
    assert hits >= 80  # observed: 86 of 100


def test_edges():
    costs = [{"a": 1.0, "b": 0.5}, {"a": 2.0, "b": 0.1}]
    sizes = [{"a": 10, "b": 20}, {"a": 10, "b": 20}]
    assert allocate(costs, sizes, 40) == ["b", "b"]      # everything fits: least cost
    assert allocate(costs, sizes, 20) == ["a", "a"]      # only the smallest fit
    assert allocate(costs, sizes, 30) == ["a", "b"]      # the bigger saving per byte
    with pytest.raises(ValueError, match="below the smallest"):
        allocate(costs, sizes, 19)
    with pytest.raises(ValueError, match="same, non-empty options"):
        allocate(costs, [{"a": 1}], 100)
