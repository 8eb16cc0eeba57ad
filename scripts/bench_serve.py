"""Serving benchmark: `lora-cli serve`'s mixed-adapter batches against the alternatives, side by side in one run.

Random weights of a preset's shape, SMS texts (one per request, as a classification client sends them), rank-8
LoRA on every Linear of the blocks, two labels, adapters chosen uniformly per text. Two parts:

1. The model, in this process, on the same batches of 64 texts (rounds alternate the systems, so the
   machine's drift cancels out): texts/s of
     lora-cli            MultiAdapterModel: rows grouped by adapter, one packed forward (what the server runs)
     lora-cli gathered   the same, with each token's A and B gathered per row instead (the BGMV layout)
     (a) merged          one adapter merged into the base, every row through it: the ceiling, no LoRA cost
     (b) peft mixed      transformers + PEFT, all adapters loaded, `adapter_names=` per row
     (c) swap            one request at a time, its adapter's tensors swapped into one LoRA model first
2. The server over HTTP on 127.0.0.1 (a subprocess; clients in this process on asyncio): texts/s at saturation
   for 1, 8 and 64 adapters, a lone request's latency, and p50/p95/p99 latency under Poisson arrivals at 25%,
   50% and 90% of the saturation rate (64 adapters); then resident memory with 1,000 adapters registered and 64
   loaded, against the same server with one adapter plus 63 adapters' tensors.

Everything is bounded: --seconds per load level, --rounds of the in-process part. Loopback only.

Usage:
  python scripts/bench_serve.py --preset gpt2-small
  python scripts/bench_serve.py --preset smollm2-135m --seconds 8
  python scripts/bench_serve.py --preset gpt2-tiny --seconds 2 --rounds 1 --skip-memory   # a smoke run
  python scripts/bench_serve.py --preset smollm2-135m --device cuda --skip-memory          # the server on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench  # noqa: E402 (scripts/bench.py: presets, token folding, PEFT's classes and targets)

RANK, LABELS, BATCH = 8, ("ham", "spam"), 64


def make_files(family, cfg, out: Path, n_adapters: int, seed: int) -> tuple[Path, list[Path]]:
    """A random base and `n_adapters` random adapters (LoRA B nonzero, so every update counts)."""
    import torch

    from lora_cli.adapters.adapter import adapter_from_model, save_adapter
    from lora_cli.data.classification import LabelSet
    from lora_cli.formats.checkpoint import init_checkpoint, load_base, save_base
    from lora_cli.lora.spec import LoraSpec
    from lora_cli.tasks.classifier import build_classifier

    base_path = out / "base.safetensors"
    save_base(base_path, init_checkpoint(cfg, seed=seed), cfg)
    base = load_base(base_path)
    (out / "adapters").mkdir()
    paths = []
    for i in range(n_adapters):
        spec = LoraSpec(rank=RANK, alpha=16, target_spec=["blocks"], head_bias=False)  # PEFT-exportable
        model = build_classifier(base, len(LABELS), spec, seed=seed + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".lora.B"):
                    p.normal_(0, 0.02)
        path = out / "adapters" / f"a{i:02d}.safetensors"
        save_adapter(path, adapter_from_model(model, spec, LabelSet(list(LABELS)), base, {"max_length": 128}))
        paths.append(path)
    return base_path, paths


# ---------------------------------------------------------------- part 1: the model, in this process

def in_process(base_path: Path, adapters: list[Path], tokens: list[list[int]], args) -> dict[str, float]:
    import torch

    from lora_cli.adapters.adapter import load_adapter, model_with_adapter
    from lora_cli.adapters.merge import merge_lora
    from lora_cli.formats.checkpoint import load_base
    from lora_cli.serve.engine import MultiAdapterModel

    torch.set_grad_enabled(False)
    base = load_base(base_path)
    loaded = [load_adapter(p) for p in adapters]
    rng = random.Random(args.seed)
    batches = []
    for _ in range(args.batches):
        rows = sorted((rng.randrange(len(loaded)), rng.choice(tokens)) for _ in range(BATCH))
        batches.append(([s for s, _ in rows], [t for _, t in rows]))

    engine = MultiAdapterModel(base, torch.device("cpu"))
    for slot, adapter in enumerate(loaded):
        engine.install(slot, adapter)
    merged = model_with_adapter(base, loaded[0])
    merge_lora(merged)
    swap = model_with_adapter(base, loaded[0])
    gathered = _gathered(engine, len(loaded))
    peft_model = _peft(base, loaded)
    pad = engine.pad_id

    def padded(rows):
        lengths = [len(t) for t in rows]
        ids = torch.full((len(rows), max(lengths)), pad, dtype=torch.long)
        for i, t in enumerate(rows):
            ids[i, : len(t)] = torch.tensor(t)
        return ids, torch.tensor(lengths) - 1

    def run_ours(slots, rows):
        engine.logits(slots, rows)

    def run_gathered(slots, rows):
        with gathered(slots, rows):
            engine.logits(slots, rows)

    def run_merged(slots, rows):
        merged(*padded(rows))

    def run_peft(slots, rows):
        ids, last = padded(rows)
        mask = (torch.arange(ids.shape[1])[None] <= last[:, None]).long()
        peft_model(input_ids=ids, attention_mask=mask, adapter_names=[f"a{s}" for s in slots])

    def run_swap(slots, rows):
        order = list(range(len(rows)))
        random.Random(len(rows)).shuffle(order)  # requests arrive in any order, not grouped
        for i in order:
            swap.load_state_dict(loaded[slots[i]].tensors, strict=False)
            swap(*padded([rows[i]]))

    systems = {"lora-cli": run_ours, "lora-cli gathered": run_gathered, "(a) merged": run_merged,
               "(b) peft mixed": run_peft, "(c) swap": run_swap}
    texts = {name: [] for name in systems}
    for round_ in range(args.rounds):
        line = []
        for name, fn in systems.items():
            fn(*batches[0])  # warm-up
            start = time.perf_counter()
            for slots, rows in batches:
                fn(slots, rows)
            texts[name].append(len(batches) * BATCH / (time.perf_counter() - start))
            line.append(f"{name} {texts[name][-1]:.1f}")
        print(f"round {round_ + 1}/{args.rounds}: " + "  ".join(line), flush=True)
    return {name: statistics.median(v) for name, v in texts.items()}


def _gathered(engine, n: int):
    """A context in which every multi-adapter Linear gathers each token's A and B (zero where an adapter has none)."""
    import contextlib

    import torch

    from lora_cli.lora.multi import MultiLoRALinear

    stacks = {}
    for name, layer in engine.layers.items():
        a = torch.zeros(n, layer.in_features, RANK)
        b = torch.zeros(n, RANK, layer.out_features)
        for slot, (fa, fb) in layer.factors.items():
            a[slot], b[slot] = fa, fb
        stacks[name] = (a, b)

    @contextlib.contextmanager
    def patched(slots, rows):
        per_token = torch.tensor([s for s, t in zip(slots, rows) for _ in t])
        per_row = torch.tensor(slots)
        original = MultiLoRALinear.forward
        names = {id(layer): name for name, layer in engine.layers.items()}

        def forward(self, x):
            a, b = stacks[names[id(self)]]
            idx = per_token if x.shape[0] == len(per_token) else per_row
            return self.linear(x) + torch.bmm(torch.bmm(x[:, None], a[idx]), b[idx])[:, 0]

        MultiLoRALinear.forward = forward
        try:
            yield
        finally:
            MultiLoRALinear.forward = original

    return patched


def _peft(base, loaded):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    family, cfg = base.family, base.config
    fam = bench.FAMILIES[family.name]
    pad = family.pad_id
    hf = family.config_to_hf(cfg) | {"num_labels": len(LABELS), "pad_token_id": pad} | dict(fam.hf_extra)
    model = getattr(transformers, fam.hf_classifier)(getattr(transformers, fam.hf_config)(**hf))
    backbone = {k: v for k, v in base.state.items() if not k.startswith("out_head.")}
    model.load_state_dict({fam.hf_prefix + k: v for k, v in family.native_to_hf(backbone, cfg).items()}, strict=False)
    config = LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=16, lora_dropout=0.0,
                        target_modules=bench.peft_targets(family), modules_to_save=["score"],
                        fan_in_fan_out=fam.fan_in_fan_out)
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, len(loaded)):
        peft_model.add_adapter(f"a{i}", config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return peft_model.eval()


# ---------------------------------------------------------------- part 2: the server over HTTP

def start_server(base_path: Path, adapter_dir: Path, tokenizer: list[str], extra: list[str] = (),
                 device: str = "cpu") -> tuple[subprocess.Popen, int]:
    log = adapter_dir.parent / f"server-{time.monotonic_ns()}.log"
    proc = subprocess.Popen([sys.executable, "-m", "lora_cli", "serve", "--model", str(base_path), "--adapter-dir",
                             str(adapter_dir), "--port", "0", "--device", device, "--max-queue", "100000", *tokenizer,
                             *extra], stdout=subprocess.DEVNULL, stderr=log.open("w"))
    deadline = time.monotonic() + 600
    while "serving" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return proc, int(re.search(r"127\.0\.0\.1:(\d+)", log.read_text()).group(1))


class Load:
    """HTTP/1.1 keep-alive clients on asyncio streams: little client work per request, so the server is measured."""

    def __init__(self, port: int, texts: list[str], names: list[str], seed: int) -> None:
        self.port, self.texts, self.names = port, texts, names
        self.rng = random.Random(seed)

    def body(self) -> bytes:
        return json.dumps({"model": self.rng.choice(self.names), "input": self.rng.choice(self.texts)}).encode()

    async def _one(self, conn) -> float:
        reader, writer = conn
        body = self.body()
        start = time.perf_counter()
        writer.write(b"POST /classify HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        reply = await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{head.splitlines()[0]!r}: {reply[:200]!r}")
        return time.perf_counter() - start

    async def closed(self, clients: int, seconds: float) -> float:
        """Texts/s with `clients` each sending its next request when the last is answered."""
        conns = [await asyncio.open_connection("127.0.0.1", self.port) for _ in range(clients)]
        done, stop = 0, time.perf_counter() + seconds
        start = time.perf_counter()

        async def client(conn):
            nonlocal done
            while time.perf_counter() < stop:
                await self._one(conn)
                done += 1

        await asyncio.gather(*(client(c) for c in conns))
        rate = done / (time.perf_counter() - start)
        for _, w in conns:
            w.close()
        return rate

    async def open(self, rate: float, seconds: float) -> list[float]:
        """Latencies of Poisson arrivals at `rate` requests/s (a pool of connections, one request each at a time).

        The pool hands out the connection used last, as HTTP clients' pools do; one idle past the server's keep-alive
        timeout (5 s) is closed by the server, and is reopened (the time to do so counted in that request's latency).
        """
        pool: asyncio.LifoQueue = asyncio.LifoQueue()
        for _ in range(64):
            pool.put_nowait(await asyncio.open_connection("127.0.0.1", self.port))
        latencies: list[float] = []

        async def one():
            conn = await pool.get()
            start = time.perf_counter()
            try:
                await self._one(conn)
            except (asyncio.IncompleteReadError, ConnectionError):  # closed by the server while idle
                conn[1].close()
                conn = await asyncio.open_connection("127.0.0.1", self.port)
                await self._one(conn)
            latencies.append(time.perf_counter() - start)
            pool.put_nowait(conn)

        tasks, t, stop = [], time.perf_counter(), time.perf_counter() + seconds
        while t < stop:
            t += self.rng.expovariate(rate)
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        while not pool.empty():
            pool.get_nowait()[1].close()
        return latencies


def warm(load: Load, names: list[str]) -> None:
    """One request for each adapter (so that every one is loaded before anything is timed), then a second of load."""
    for name in names:
        load.names = [name]
        asyncio.run(load.closed(1, 0.001))
    load.names = names
    asyncio.run(load.closed(8, 1.0))


def percentiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=100)
    return q[49] * 1000, q[94] * 1000, q[98] * 1000


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def http_part(base_path, adapters, texts, tokenizer, args) -> dict:
    out: dict = {"saturation": {}}
    for k in (1, 8, 64):
        if k > len(adapters):
            continue
        names = [p.stem for p in adapters[:k]]
        proc, port = start_server(base_path, adapters[0].parent, tokenizer, device=args.device)
        try:
            load = Load(port, texts, names, args.seed)
            warm(load, names)
            rate = asyncio.run(load.closed(args.clients, args.seconds))
            out["saturation"][k] = rate
            print(f"server, {k} adapters: {rate:.1f} texts/s at saturation ({args.clients} clients)", flush=True)
            if k == min(64, len(adapters)):
                lone = [asyncio.run(load.closed(1, args.seconds / 4))]
                single = asyncio.run(load.open(1.0, min(args.seconds, 5)))
                out["lone_ms"] = statistics.median(single) * 1000
                out["lone_rate"] = lone[0]
                out["latency"] = {}
                for share in (0.25, 0.5, 0.9):
                    lat = asyncio.run(load.open(rate * share, args.seconds))
                    out["latency"][share] = percentiles(lat)
                    p50, p95, p99 = out["latency"][share]
                    print(f"  at {share:.0%} of saturation ({rate * share:.1f}/s): p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
                          f"p99 {p99:.1f} ms", flush=True)
                print(f"  a lone request: {out['lone_ms']:.1f} ms (median)", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    return out


def memory_part(base_path: Path, adapters: list[Path], texts, tokenizer, args) -> dict:
    """RSS with 1,000 registered (hard links to the adapters: separate files to the server) and 64 loaded."""
    many = adapters[0].parent.parent / "many"
    one = adapters[0].parent.parent / "one"
    many.mkdir()
    one.mkdir()
    os.link(adapters[0], one / adapters[0].name)
    for i in range(args.registered):
        os.link(adapters[i % len(adapters)], many / f"r{i:04d}.safetensors")
    loaded = min(64, args.registered)
    adapter_mb = sum(t.numel() * 4 for t in _tensors(adapters[0])) / 2**20
    sizes = {}
    for label, directory, names in (("one", one, [adapters[0].stem]),
                                    ("many", many, [f"r{i:04d}" for i in range(loaded)])):
        proc, port = start_server(base_path, directory, tokenizer, ["--max-loaded", str(loaded)])
        try:
            warm(Load(port, texts, names, args.seed), names)
            sizes[label] = rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)
    expected = sizes["one"] + (loaded - 1) * adapter_mb
    print(f"memory: one adapter {sizes['one']:.0f} MB; {args.registered} registered and {loaded} loaded "
          f"{sizes['many']:.0f} MB = {sizes['many'] / expected:.2f}x of one adapter's server + {loaded - 1} adapters' "
          f"tensors ({adapter_mb:.2f} MB each)", flush=True)
    return {"one_mb": sizes["one"], "many_mb": sizes["many"], "adapter_mb": adapter_mb, "ratio": sizes["many"] / expected}


def _tensors(path: Path):
    from lora_cli.adapters.adapter import load_adapter

    return load_adapter(path).tensors.values()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--adapters", type=int, default=64, help="adapters made (the 1/8/64 runs use the first ones)")
    parser.add_argument("--batches", type=int, default=4, help="batches of 64 texts per system per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="per load level over HTTP")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--registered", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="the servers' device (the in-process part runs on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    family, cfg = bench.find_preset(parser, args.preset)
    shared = Path(args.shared)
    with open(shared / "sms_spam" / "SMSSpamCollection", encoding="utf-8") as f:
        texts = [line.split("\t", 1)[1].strip() for line in f if "\t" in line][:2000]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_path, adapters = make_files(family, cfg, tmp, args.adapters, args.seed)
        tokens = bench.encode_splits({"all": texts}, cfg, family.pad_id, shared, tmp)[0]["all"]
        tokens = [t for t in tokens if t]
        if cfg.vocab_size >= bench.MIN_BPE_VOCAB and family.name == "gpt2":
            tokenizer = ["--bpe-dir", str(shared / "gpt2_bpe")]
        else:
            subprocess.run([sys.executable, str(REPO / "scripts" / "make_tokenizer.py"),
                            str(shared / "sms_spam" / "SMSSpamCollection"), str(tmp / "tokenizer.json"),
                            "--vocab-size", str(min(400, cfg.vocab_size))], check=True, capture_output=True)
            tokenizer = ["--tokenizer", str(tmp / "tokenizer.json")]
        print(f"{args.preset}, {len(adapters)} adapters (r={RANK}, blocks), batches of {BATCH} SMS texts "
              f"(mean {statistics.mean(map(len, tokens)):.1f} tokens), cpu float32, {torch.get_num_threads()} threads",
              flush=True)
        result = {"preset": args.preset, "threads": torch.get_num_threads()}
        model = {}
        if not args.skip_in_process:
            model = result["in_process"] = in_process(base_path, adapters, tokens, args)
            print("\nin-process, same batches      texts/s   lora-cli / this")
            for name, rate in model.items():
                print(f"  {name:<26} {rate:8.1f}   {model['lora-cli'] / rate:6.2f}x")
        if not args.skip_http:
            print()
            result["http"] = http_part(base_path, adapters, texts, tokenizer, args)
            if result["http"]["saturation"] and model:
                top = result["http"]["saturation"][max(result["http"]["saturation"])]
                print(f"  server at {max(result['http']['saturation'])} adapters / in-process (a) merged: "
                      f"{top / model['(a) merged']:.2f}x; / (b) peft mixed: {top / model['(b) peft mixed']:.2f}x")
        if not args.skip_memory:
            result["memory"] = memory_part(base_path, adapters, texts, tokenizer, args)
    print(f"\n{(time.time() - started) / 60:.1f} minutes")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
