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


def test_interleaved_samples_keep_every_round_and_interleaved_takes_their_median() -> None:
    clock = iter(range(1000))
    fns = {name: (lambda: next(clock)) for name in ("a", "b")}
    samples = timing.interleaved_samples(fns, rounds=7, inner=3, warmup=0)
    assert {k: len(v) for k, v in samples.items()} == {"a": 7, "b": 7}
    assert all(t >= 0 for v in samples.values() for t in v)


def test_paired_ratio_cancels_load_that_drifts_between_rounds() -> None:
    # Ours is 10 % faster in every round while the machine's load makes each round slower than the last.
    peer = [1.0 * 1.5**r for r in range(9)]
    ours = [0.9 * t for t in peer]
    median, q1, q3 = timing.paired_ratio(ours, peer)
    assert abs(median - 0.9) < 1e-12 and abs(q1 - 0.9) < 1e-12 and abs(q3 - 0.9) < 1e-12
    # Rounds spread: the quartiles of the per-round ratio bracket its median.
    assert timing.paired_ratio([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5) == (3.0, 2.0, 4.0)
    assert timing.paired_ratio([2.0], [4.0]) == (0.5, 0.5, 0.5)
