"""The llama.cpp pool's books (engine/kv_pool.py) against the calls they make on llama.cpp's memory
API, recorded: which sequence a prompt takes, what it reuses, what it shares, what gives way.
tests/test_prefix_cache.py runs the same pool on a real llama.cpp model."""

from __future__ import annotations

from neuron.engine.kv_pool import KvPool
from neuron.engine.prefix import PrefixStats


class Recorded:
    """llama.cpp's memory API as a log of the calls the pool made."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def remove(self, seq: int, start: int) -> bool:
        self.calls.append(("remove", seq, start))
        return True

    def share(self, source: int, target: int, length: int) -> None:
        self.calls.append(("share", source, target, length))

    def clear(self) -> None:
        self.calls.append(("clear",))


def _pool(sequences: int = 3, capacity: int = 1000) -> tuple[KvPool, Recorded]:
    cells = Recorded()
    pool = KvPool(cells, sequences=sequences, capacity=capacity, bytes_per_token=1, reuse=True, stats=PrefixStats())
    return pool, cells


def _run(pool: KvPool, prompt: list[int], answer: list[int] = ()) -> tuple[int, int]:
    """A job: claims a sequence, feeds what its prompt did not reuse and its answer, ends."""
    seq, reused = pool.claim(prompt, ["fp"])
    pool.fed(seq, prompt[reused:] + list(answer))
    pool.release(seq)
    return seq, reused


def test_the_next_turn_reuses_the_last_one_in_place() -> None:
    pool, cells = _pool()
    first, _ = _run(pool, list(range(100)), [500, 501])
    cells.calls.clear()
    seq, reused = pool.claim([*range(100), 500, 501, 7, 8], ["fp"])
    assert (seq, reused) == (first, 102)
    assert cells.calls == []  # nothing to drop: it held exactly the shared part


def test_a_diverging_prompt_drops_only_the_tail() -> None:
    pool, cells = _pool()
    first, _ = _run(pool, list(range(100)))
    cells.calls.clear()
    assert pool.claim([*range(80), 9, 9], ["fp"]) == (first, 80)
    assert cells.calls == [("remove", first, 80)]


def test_a_short_shared_part_is_shared_and_the_holder_keeps_the_rest() -> None:
    pool, cells = _pool(sequences=2)
    holder, _ = _run(pool, list(range(100)))
    other, _ = _run(pool, [7] * 50)  # now the holder is the oldest kept sequence
    cells.calls.clear()
    seq, reused = pool.claim([*range(10), 9, 9], ["fp"])
    assert reused == 10 and seq == other  # not the holder: its 90 other tokens stay for their own turn
    assert cells.calls == [("remove", other, 0), ("share", holder, other, 10)]
    assert pool.claim(list(range(100)), ["fp"]) == (holder, 99)


def test_cells_shared_by_sequences_count_once() -> None:
    pool, _ = _pool()
    system = list(range(200))
    running, _ = pool.claim([*system, 1], ["fp"])
    pool.fed(running, [*system, 1])
    seq, reused = pool.claim([*system, 2], ["fp"])  # while the first still runs
    pool.fed(seq, [2])
    assert reused == 200 and seq != running
    assert pool.positions == 402 and pool.used == 202


def test_kept_sequences_give_way_oldest_first_to_running_ones() -> None:
    pool, cells = _pool(sequences=3, capacity=300)
    oldest, _ = _run(pool, [1] * 100)
    newer, _ = _run(pool, [2] * 100)
    cells.calls.clear()
    seq, _ = pool.claim([3] * 150, ["fp"])
    assert pool.make_room(150)
    assert cells.calls == [("remove", oldest, 0)]  # the newer one stays: there is room now
    pool.fed(seq, [3] * 150)
    assert pool.used == 250
    assert not pool.make_room(200)  # the newer one goes too, and still 200 more do not fit
    assert cells.calls[-1] == ("remove", newer, 0)
