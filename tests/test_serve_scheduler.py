"""The scheduler alone, on a fake model: grouping, token limits, order, isolation of one adapter's failure, cold
loads that do not stall the others, and the LRU."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from lora_cli.data.classification import LabelSet
from lora_cli.serve.metrics import Metrics
from lora_cli.serve.scheduler import AdapterFailed, QueueFull, Scheduler


class FakeEngine:
    """Row i's logits are [slot, first token]: which adapter and which text each answer came from."""

    precision = "fp32"

    def __init__(self, fail_slot: int | None = None) -> None:
        self.calls: list[tuple[list[int], list[list[int]]]] = []
        self.installed: dict[int, str] = {}
        self.fail_slot = fail_slot

    def install(self, slot: int, adapter) -> None:
        self.installed[slot] = adapter.name

    def remove(self, slot: int) -> None:
        self.installed.pop(slot, None)

    def logits(self, slots: list[int], tokens: list[list[int]]) -> torch.Tensor:
        self.calls.append((list(slots), [list(t) for t in tokens]))
        if self.fail_slot in slots:
            raise RuntimeError("boom")
        return torch.tensor([[float(s), float(t[0])] for s, t in zip(slots, tokens)])


class FakeRegistry:
    def __init__(self, slow: dict[str, float] | None = None) -> None:
        self.slow = slow or {}
        self.reads: list[str] = []

    def entry(self, name: str):
        adapter = SimpleNamespace(multi_label=False, temperature=1.0, labels=LabelSet(["a", "b"]), name=name)
        return SimpleNamespace(name=name, labels=["a", "b"], adapter=adapter)

    def read(self, name: str):
        self.reads.append(name)
        time.sleep(self.slow.get(name, 0))
        return SimpleNamespace(name=name)


def make(engine=None, registry=None, **kw) -> Scheduler:
    options = {"max_loaded": 8, "max_batch_tokens": 1000, "max_wait_ms": 50, "max_queue": 100} | kw
    return Scheduler(registry or FakeRegistry(), engine or FakeEngine(), Metrics({}), **options)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def submit(s: Scheduler, name: str, *firsts: int, length: int = 2):
    return s.submit(s.registry.entry(name), [f"t{f}" for f in firsts], [[f] * length for f in firsts])


def test_jobs_of_many_adapters_share_one_forward_grouped_by_adapter() -> None:
    async def go():
        engine = FakeEngine()
        s = make(engine)
        s.start()
        # warm the three adapters up one by one, so that the next jobs find them all loaded
        for name in ("x", "y", "z"):
            await submit(s, name, 0).future
        engine.calls.clear()
        jobs = [submit(s, "x", 1, 2), submit(s, "y", 3), submit(s, "x", 4), submit(s, "z", 5, 6)]
        results = [await j.future for j in jobs]
        await s.stop()
        return engine, s, jobs, results

    engine, s, jobs, results = run(go())
    assert len(engine.calls) == 1
    slots, tokens = engine.calls[0]
    assert slots == sorted(slots)  # grouped by adapter
    assert sorted(t[0] for t in tokens) == [1, 2, 3, 4, 5, 6]
    for job, predictions in zip(jobs, results):
        assert [p.text for p in predictions] == job.texts  # each job gets its own rows back, in order
        slot = s.loaded[job.name]
        for p, tok in zip(predictions, job.tokens):
            expected = torch.softmax(torch.tensor([float(slot), float(tok[0])]), -1).tolist()
            assert list(p.probabilities.values()) == pytest.approx(expected)


def test_token_budget_splits_batches_in_arrival_order() -> None:
    async def go():
        engine = FakeEngine()
        s = make(engine, max_batch_tokens=10, max_wait_ms=100)
        s.start()
        await submit(s, "x", 0).future
        engine.calls.clear()
        jobs = [submit(s, "x", i, length=4) for i in range(1, 6)]  # 4 tokens each: 2 jobs a batch
        await asyncio.gather(*(j.future for j in jobs))
        await s.stop()
        return engine

    engine = run(go())
    assert [[t[0] for t in tokens] for _, tokens in engine.calls] == [[1, 2], [3, 4], [5]]


def test_a_failing_adapter_fails_only_its_own_jobs() -> None:
    async def go():
        engine = FakeEngine()
        s = make(engine)
        s.start()
        await submit(s, "good", 0).future
        await submit(s, "bad", 0).future
        engine.fail_slot = s.loaded["bad"]
        good, bad, good2 = submit(s, "good", 1), submit(s, "bad", 2), submit(s, "good", 3)
        outcome = await asyncio.gather(good.future, bad.future, good2.future, return_exceptions=True)
        await s.stop()
        return outcome

    good, bad, good2 = run(go())
    assert isinstance(bad, AdapterFailed) and "adapter 'bad' failed: RuntimeError: boom" in str(bad)
    assert [p.text for p in good] == ["t1"] and [p.text for p in good2] == ["t3"]


def test_queue_bound() -> None:
    async def go():
        s = make(max_queue=2, max_wait_ms=10_000)  # not started: nothing leaves the queue
        submit(s, "x", 1)
        submit(s, "x", 2)
        with pytest.raises(QueueFull, match="--max-queue 2"):
            submit(s, "x", 3)
        s._worker.shutdown()
        s._loader.shutdown()

    run(go())


def test_a_cold_adapter_does_not_stall_the_others() -> None:
    async def go():
        registry = FakeRegistry(slow={"cold": 1.0})
        s = make(registry=registry, max_wait_ms=5)
        s.start()
        await submit(s, "warm", 0).future
        cold = submit(s, "cold", 1)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await submit(s, "warm", 2).future
        warm_took = time.monotonic() - started
        done_before = cold.future.done()
        await cold.future
        await s.stop()
        return warm_took, done_before

    warm_took, cold_done_first = run(go())
    assert not cold_done_first and warm_took < 0.8


def test_the_least_recently_used_adapter_goes_first() -> None:
    async def go():
        engine = FakeEngine()
        s = make(engine, max_loaded=2)
        s.start()
        for name in ("a", "b", "c", "a"):
            await submit(s, name, 0).future
        order = list(s.loaded)
        await s.stop()
        return order, engine, s

    order, engine, s = run(go())
    assert order == ["c", "a"]  # b was the least recently used when a came back
    assert s.metrics.adapter_evictions == 2 and sorted(engine.installed.values()) == ["a", "c"]


def test_a_loaded_adapters_file_tensors_are_freed_before_the_heap_is_trimmed(monkeypatch) -> None:
    """Once installed, the tensors read from the file are garbage: nothing holds them when the memory is returned."""
    import weakref

    from lora_cli.serve import scheduler

    class Read:  # what registry.read returns, weak-referenceable
        def __init__(self, name: str) -> None:
            self.name = name

    reads: list[weakref.ref] = []
    alive_at_trim: list[bool] = []
    registry = FakeRegistry()
    registry.read = lambda name: (reads.append(weakref.ref(r := Read(name))), r)[1]
    monkeypatch.setattr(scheduler, "return_freed_memory", lambda: alive_at_trim.append(reads[-1]() is not None))

    async def go():
        s = make(registry=registry)
        s.start()
        await submit(s, "x", 1).future
        await s.stop()

    run(go())
    assert alive_at_trim == [False]
