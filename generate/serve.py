r"""Serve a litmodel checkpoint over an OpenAI-compatible HTTP API, decoding concurrent requests together.

    pip install -e ".[serve]"
    python generate/serve.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 50}'

Endpoints: POST /v1/chat/completions (the checkpoint's chat template, as generate/chat.py renders it),
POST /v1/completions, GET /v1/models, GET /health. Requests that arrive together are decoded together
(continuous batching over --max_batch_size slots of one KV cache of --max_seq_length positions); when
every slot is busy up to --max_queue requests wait, and further ones get HTTP 429. SIGTERM (or Ctrl-C)
lets in-flight requests finish for up to --shutdown_timeout seconds, then exits 0. See docs/serving.md.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Literal, Optional

from litmodel.batching import BatchEngine, EngineThread
from litmodel.cli import cli_main, parse_function_args
from litmodel.generation_cli import model_bytes
from litmodel.generation_setup import setup_generation
from litmodel.precision import precision_name
from litmodel.utils import LitModelError

DEFAULT_MAX_SEQ_LENGTH = 2048  # KV cache positions per slot unless --max_seq_length says otherwise


def main(
    checkpoint_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_length: Optional[int] = None,
    max_queue: int = 64,
    api_key: Optional[str] = None,
    shutdown_timeout: float = 30.0,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: bool = False,
    quantize: Optional[Literal["int8"]] = None,
    device: str = "auto",
    accelerator: Optional[str] = None,
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
) -> None:
    """Run the HTTP server until SIGTERM / Ctrl-C.

    Args:
        checkpoint_dir: A litmodel checkpoint dir (model.safetensors, model_config.yaml, tokenizer files).
        host: The address to bind; 127.0.0.1 (this machine only) unless you mean to expose it (0.0.0.0).
        port: The TCP port.
        max_batch_size: Requests decoded together (slots of the KV cache).
        max_seq_length: Prompt + completion tokens one request may use (KV cache positions per slot);
            default: the model's context, at most 2048.
        max_queue: Requests that may wait for a free slot; more get HTTP 429 (retry later).
        api_key: Require "Authorization: Bearer KEY" on every /v1 request (401 otherwise); default: the
            LITMODEL_API_KEY environment variable, if set.
        shutdown_timeout: Seconds in-flight requests get to finish after SIGTERM before they are cut.
        precision: Weights and compute dtype: 32-true, bf16-true or 16-true (default: bf16-true).
        compile: torch.compile the decode step (compiled for each batch bucket 1, 2, 4, ... at start-up).
        quantize: "int8": int8 weight-only quantization of every linear layer.
        device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
        accelerator: Alias of --device (cpu, cuda, gpu or auto); overrides it when given.
        log_level: uvicorn's log level (info logs one line per request).
    """
    from litmodel.server import create_app  # an optional extra: fails with the pip line before loading weights

    try:
        import uvicorn  # deferred: only the server needs it
    except ImportError:
        raise LitModelError('serving needs uvicorn; pip install -e ".[serve]"') from None
    if max_queue < 0:
        raise LitModelError(f"--max_queue must be >= 0, got {max_queue}")
    if shutdown_timeout < 0:
        raise LitModelError(f"--shutdown_timeout must be >= 0, got {shutdown_timeout}")
    api_key = api_key or os.environ.get("LITMODEL_API_KEY") or None
    gen = setup_generation(checkpoint_dir, device=accelerator or device, precision=precision, quantize=quantize,
                           compile=compile)
    length = max_seq_length or min(gen.config.block_size, DEFAULT_MAX_SEQ_LENGTH)
    if length > gen.config.block_size:
        raise LitModelError(f"--max_seq_length {length} exceeds the model's context of {gen.config.block_size} tokens; "
                            f"use --max_seq_length {gen.config.block_size} or less")
    engine = BatchEngine(gen.model, gen.tokenizer, max_batch_size=max_batch_size, max_seq_length=length,
                         decode_step=gen.decode_step, max_queue=max_queue)
    print(f"loaded {checkpoint_dir} in {gen.load_seconds:.1f} s ({precision_name(gen.dtype)}"
          f"{', int8' if quantize else ''}, {model_bytes(gen.model) / 1e6:.1f} MB of weights, {gen.device}); "
          f"{max_batch_size} slots x {engine.max_seq_length} tokens ({engine.cache_bytes / 1e6:.0f} MB of KV cache)",
          file=sys.stderr)
    if compile:
        t0 = time.perf_counter()
        engine.warmup()
        print(f"compiled the decode step in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: listening on {host} without --api_key: anyone who can reach it can use it", file=sys.stderr)
    app = create_app(EngineThread(engine), gen.tokenizer, model_name=str(checkpoint_dir), api_key=api_key,
                     shutdown_timeout=shutdown_timeout)

    def on_stop_signal(signum, frame):
        # uvicorn handles the signal while it runs and raises it again once it has shut down gracefully;
        # this handler then keeps the exit status 0 (a clean, requested stop)
        print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr)

    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout)
    uvicorn.Server(config).run()


def setup(argv: Optional[list[str]] = None) -> None:
    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
