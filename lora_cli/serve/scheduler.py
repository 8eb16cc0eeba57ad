"""Batching across adapters: waiting requests, whichever adapters they name, share one forward of the base.

The loop gathers jobs for up to `max_wait_ms` after the oldest arrived (or until `max_batch_tokens` are
waiting), takes those whose adapter is in the model, oldest first, and runs them as one batch on the
worker thread. A job whose adapter is cold starts its load on a loader thread and waits for it while
other adapters' batches go on. Installing, evicting and running all happen on the one worker thread, so
the model never changes under a forward pass.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lora_cli.api.classifier import Prediction, predictions, probabilities
from lora_cli.evaluation.classification import check_finite_logits
from lora_cli.runtime.allocator import return_freed_memory
from lora_cli.serve.engine import MultiAdapterModel
from lora_cli.serve.metrics import Metrics
from lora_cli.serve.registry import Registered, Registry
from lora_cli.util.errors import LoraCliError


class QueueFull(Exception):
    """More jobs waiting than `max_queue`: the client should retry later."""


class AdapterFailed(LoraCliError):
    """An adapter could not be read, or its rows gave no usable numbers: only its own requests fail."""


@dataclass(eq=False)
class Job:
    """One request's texts for one adapter, and the future its predictions arrive in."""

    entry: Registered
    texts: list[str]
    tokens: list[list[int]]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def n_tokens(self) -> int:
        return sum(map(len, self.tokens))


class Scheduler:
    def __init__(self, registry: Registry, engine: MultiAdapterModel, metrics: Metrics, *, max_loaded: int,
                 max_batch_tokens: int, max_wait_ms: float, max_queue: int) -> None:
        self.registry, self.engine, self.metrics = registry, engine, metrics
        self.max_loaded, self.max_batch_tokens = max_loaded, max_batch_tokens
        self.max_wait, self.max_queue = max_wait_ms / 1000, max_queue
        self.pending: list[Job] = []
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.loading: dict[str, asyncio.Task] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._wake = asyncio.Event()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lora-cli-forward")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="lora-cli-load")
        self._task: asyncio.Task | None = None

    # ---- what the HTTP layer calls
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Fail what still waits (the HTTP server has drained its requests by now) and stop the threads."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for job in self.pending:
            if not job.future.done():
                job.future.set_exception(LoraCliError("the server is shutting down"))
        self.pending.clear()
        self._worker.shutdown(wait=True)
        self._loader.shutdown(wait=True)

    def submit(self, entry: Registered, texts: list[str], tokens: list[list[int]]) -> Job:
        if len(self.pending) >= self.max_queue:
            raise QueueFull(f"{len(self.pending)} requests are waiting (--max-queue {self.max_queue})")
        job = Job(entry, texts, tokens, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self._wake.set()
        return job

    async def unload(self, name: str) -> None:
        """Take an adapter out of the model (on the worker, between batches) and fail its waiting jobs."""
        for job in [j for j in self.pending if j.name == name]:
            self.pending.remove(job)
            if not job.future.done():
                job.future.set_exception(LoraCliError(f"adapter {name!r} was unloaded"))
        task = self.loading.pop(name, None)
        if task is not None:
            task.cancel()
        if name in self.loaded:
            slot = self.loaded.pop(name)
            await asyncio.get_running_loop().run_in_executor(self._worker, self._free, slot)

    # ---- the loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self.pending:
                await self._sleep(None)
                continue
            deadline = self.pending[0].arrived + self.max_wait
            while sum(j.n_tokens for j in self.pending) < self.max_batch_tokens and time.monotonic() < deadline:
                await self._sleep(deadline - time.monotonic())
            self._drop_cancelled()
            batch = self._take()
            if not batch:  # every waiting job's adapter is still loading
                await self._sleep(None)
                continue
            for job in batch:
                self.loaded.move_to_end(job.name)
            slots = {job.name: self.loaded[job.name] for job in batch}
            results = await loop.run_in_executor(self._worker, self._forward, batch, slots)
            for job, result in zip(batch, results):
                if job.future.done():  # the client left, or timed out, meanwhile
                    continue
                if isinstance(result, Exception):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    async def _sleep(self, timeout: float | None) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _drop_cancelled(self) -> None:
        self.pending = [j for j in self.pending if not j.future.done()]

    def _take(self) -> list[Job]:
        """The oldest jobs whose adapters are loaded, within the token budget (one job always fits); starts
        loading the adapters of the others."""
        batch: list[Job] = []
        tokens = 0
        for job in self.pending:
            if job.name not in self.loaded:
                self._load(job.name)
                continue
            if batch and tokens + job.n_tokens > self.max_batch_tokens:
                break
            batch.append(job)
            tokens += job.n_tokens
        taken = set(map(id, batch))
        self.pending = [j for j in self.pending if id(j) not in taken]
        return batch

    # ---- loading adapters
    def _load(self, name: str) -> None:
        if name not in self.loading:
            self.loading[name] = asyncio.get_running_loop().create_task(self._load_task(name))

    async def _load_task(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            # In a list that `_install` empties: the executor's future keeps its result, the file's tensors with it.
            handed = await loop.run_in_executor(self._loader, lambda: [self.registry.read(name)])
            # The bookkeeping changes now, the model on the worker after the batches already sent to it (its one
            # thread runs in order): a batch formed from here on sees the new adapter and none of the evicted.
            victims = self._victims({j.name for j in self.pending})
            for victim, _ in victims:
                del self.loaded[victim]
            slot = self.loaded[name] = self._slot()
            try:
                await loop.run_in_executor(self._worker, self._install, slot, handed, [s for _, s in victims])
            except BaseException:
                self.loaded.pop(name, None)
                raise
            self.metrics.adapter_loads += 1
            self.metrics.adapter_evictions += len(victims)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a damaged or vanished file: fail this adapter's jobs only
            message = str(exc) if isinstance(exc, LoraCliError) else f"{type(exc).__name__}: {exc}"
            for job in [j for j in self.pending if j.name == name]:
                self.pending.remove(job)
                if not job.future.done():
                    job.future.set_exception(AdapterFailed(f"adapter {name!r} could not be loaded: {message}"))
        finally:
            self.loading.pop(name, None)
            self._wake.set()

    def _slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        self._next_slot += 1
        return self._next_slot - 1

    def _victims(self, busy: set[str]) -> list[tuple[str, int]]:
        """Adapters to drop so that one more fits: least recently used first, those no job waits for before others."""
        excess = len(self.loaded) + 1 - self.max_loaded
        if excess <= 0:
            return []
        order = sorted(self.loaded.items(), key=lambda kv: kv[0] in busy)  # stable: LRU order within each group
        return order[:excess]

    def _install(self, slot: int, handed: list[Any], victims: list[int]) -> None:
        """Free the victims' slots and install the adapter in `handed` (its only reference) in `slot`."""
        for victim in victims:
            self._free(victim)
        adapter = handed.pop()
        try:
            self.engine.install(slot, adapter)
        except BaseException:
            self._free(slot)
            raise
        finally:
            # The file's tensors, read on the loader thread, are garbage once copied into the slot, and glibc keeps
            # a thread's freed blocks in that thread's arena: without the trim each load leaves its file's size behind.
            del adapter
            return_freed_memory()

    def _free(self, slot: int) -> None:
        self.engine.remove(slot)
        self._free_slots.append(slot)

    # ---- the forward pass (worker thread)
    def _forward(self, batch: list[Job], slots: dict[str, int]) -> list[list[Prediction] | Exception]:
        """Each job's predictions, or the exception that failed its adapter's rows. A failing batch is rerun
        adapter by adapter, so one adapter's failure fails only its own jobs."""
        batch_order = sorted(range(len(batch)), key=lambda i: slots[batch[i].name])
        try:
            return self._run_jobs(batch, slots, batch_order)
        except Exception:  # noqa: BLE001 (isolated below, adapter by adapter)
            results: list[list[Prediction] | Exception] = [RuntimeError()] * len(batch)
            for name in dict.fromkeys(batch[i].name for i in batch_order):
                mine = [i for i in batch_order if batch[i].name == name]
                try:
                    got = self._run_jobs([batch[i] for i in mine], slots, list(range(len(mine))))
                except Exception as exc:  # noqa: BLE001
                    message = str(exc) if isinstance(exc, LoraCliError) else f"{type(exc).__name__}: {exc}"
                    got = [AdapterFailed(f"adapter {name!r} failed: {message}")] * len(mine)
                for i, result in zip(mine, got):
                    results[i] = result
            return results

    def _run_jobs(self, jobs: list[Job], slots: dict[str, int], order: list[int]) -> list[list[Prediction]]:
        rows = [(slots[jobs[i].name], tokens) for i in order for tokens in jobs[i].tokens]
        logits = self.engine.logits([s for s, _ in rows], [t for _, t in rows])
        self.metrics.batches += 1
        self.metrics.batch_rows.observe(len(rows))
        out: list[list[Prediction]] = [[] for _ in jobs]
        start = 0
        for i in order:
            job = jobs[i]
            entry = job.entry
            classes = len(entry.labels)
            mine = logits[start:start + len(job.tokens), :classes]
            start += len(job.tokens)
            check_finite_logits(mine, f"adapter {job.name!r}", self.engine.precision)
            out[i] = predictions(entry.adapter, job.texts, probabilities(entry.adapter, mine))
        return out


def gauges(scheduler: Callable[[], Scheduler | None], registry: Registry) -> dict[str, tuple[str, Callable[[], float]]]:
    """The gauges `/metrics` reads when scraped."""

    def read(fn: Callable[[Scheduler], float]) -> Callable[[], float]:
        return lambda: fn(s) if (s := scheduler()) is not None else 0

    return {
        "queue_depth": ("Requests waiting for a batch.", read(lambda s: len(s.pending))),
        "adapters_loaded": ("Adapters in memory.", read(lambda s: len(s.loaded))),
        "adapters_registered": ("Adapters the server knows.", lambda: len(registry)),
    }

