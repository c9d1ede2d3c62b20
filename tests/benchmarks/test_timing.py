"""The benchmarks' timer: every round calls every variant, in a seeded shuffled order."""

from __future__ import annotations

from benchmark_run import load_benchmark

timing = load_benchmark("_timing.py")


def test_round_orders_are_seeded_permutations_that_vary_between_rounds() -> None:
    names = ["float32", "ours", "peer", "other"]
    orders = timing.round_orders(names, 12)
    assert len(orders) == 12
    assert all(sorted(order) == sorted(names) for order in orders)
    assert orders == timing.round_orders(names, 12)  # repeatable
    assert orders != timing.round_orders(names, 12, seed=1)
    # Not one fixed order: the variant that follows float32 changes between rounds.
    followers = {order[order.index("float32") + 1] for order in orders if order[-1] != "float32"}
    assert len(followers) > 1
    assert len({order[0] for order in orders}) > 1


def test_interleaved_calls_each_variant_warmup_plus_rounds_times_inner_in_the_shuffled_order() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = timing.interleaved(fns, rounds=5, inner=2, warmup=1)
    assert set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())
    assert calls[:3] == ["a", "b", "c"]  # the warm-up
    expected = [name for order in timing.round_orders(["a", "b", "c"], 5) for name in order for _ in range(2)]
    assert calls[3:] == expected
