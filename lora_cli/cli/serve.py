"""`lora-cli serve`: many adapters on one base over HTTP (vLLM's pooling API); the server is lora_cli.serve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cli.cli.app import BpeDirOption, ModelConfigOption, TokenizerOption, app, echo, fail, handle_errors


@app.command()
@handle_errors
def serve(
    model: Annotated[Optional[str], typer.Option(help="Base checkpoint (or a preset `download` stored).")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option(
        help="NAME=PATH: an adapter file, run directory or PEFT export to serve as NAME (repeatable).")] = None,
    adapter_dir: Annotated[Optional[Path], typer.Option(
        help="Serve every adapter in this directory (by file name), and let clients load more from it.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML file with these settings (flags override it).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on. [127.0.0.1]", show_default=False)] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (0 picks a free one). [8000]", show_default=False)] = None,
    served_model_name: Annotated[Optional[str], typer.Option(
        help="The base's name in /v1/models. [the checkpoint's file name]", show_default=False)] = None,
    max_loaded: Annotated[Optional[int], typer.Option(
        help="Adapters held in memory at once; the least recently used goes first. [64]", show_default=False)] = None,
    max_batch_tokens: Annotated[Optional[int], typer.Option(
        help="Tokens per forward pass, across adapters. [8192]", show_default=False)] = None,
    max_wait_ms: Annotated[Optional[float], typer.Option(
        help="How long a request may wait for others to share its batch. [5]", show_default=False)] = None,
    max_queue: Annotated[Optional[int], typer.Option(
        help="Requests waiting at most; more get 429. [1024]", show_default=False)] = None,
    max_texts: Annotated[Optional[int], typer.Option(help="Texts per request. [256]", show_default=False)] = None,
    max_chars: Annotated[Optional[int], typer.Option(help="Characters per text. [100000]", show_default=False)] = None,
    max_request_tokens: Annotated[Optional[int], typer.Option(
        help="Tokens per request. [--max-batch-tokens]", show_default=False)] = None,
    request_timeout: Annotated[Optional[float], typer.Option(
        help="Seconds a request may take; then 504. [60]", show_default=False)] = None,
    drain_timeout: Annotated[Optional[float], typer.Option(
        help="Seconds SIGTERM waits for the requests in flight. [30]", show_default=False)] = None,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="LORA_CLI_API_KEY", help="Require 'Authorization: Bearer KEY' (or set LORA_CLI_API_KEY).",
        show_default=False)] = None,
    access_log: Annotated[Optional[bool], typer.Option(help="Log every request. [no]", show_default=False)] = None,
    model_config: ModelConfigOption = None,
    tokenizer: TokenizerOption = None,
    bpe_dir: BpeDirOption = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps. [auto]",
                                                  show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16 (CUDA). [auto]",
                                                     show_default=False)] = None,
) -> None:
    """Serve many classification adapters on one base model over HTTP, as vLLM's /classify API.

    Requests for different adapters share each forward pass of the base. Needs the serve extra:
    pip install 'lora-cli[serve]'. Stops on SIGTERM (exit 0) or Ctrl-C after answering the requests in flight.

    Example: lora-cli serve --model gpt2-small --adapter spam=runs/spam --adapter topic=runs/topic
    """
    from lora_cli.serve.run import parse_adapter_flags, run, settings_from

    given = {
        "model": model, "adapters": parse_adapter_flags(adapter or []),
        "adapter_dir": None if adapter_dir is None else str(adapter_dir), "host": host, "port": port,
        "served_model_name": served_model_name, "max_loaded": max_loaded, "max_batch_tokens": max_batch_tokens,
        "max_wait_ms": max_wait_ms, "max_queue": max_queue, "max_texts": max_texts, "max_chars": max_chars,
        "max_request_tokens": max_request_tokens, "request_timeout": request_timeout, "drain_timeout": drain_timeout,
        "api_key": api_key, "access_log": access_log, "model_config": model_config, "tokenizer": tokenizer,
        "bpe_dir": bpe_dir, "device": device, "precision": precision,
    }
    if run(settings_from(config, given), on_ready=echo):
        raise fail("interrupted", 130)
    echo("stopped: every request in flight was answered")
