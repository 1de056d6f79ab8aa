"""The single-token decode step: eager, `torch.compile`d with static shapes (with Inductor's on-disk
cache), or captured into a CUDA graph on a GPU. The token loop (`litmodel.generate`) and the batching
engine (`litmodel.batching`) call it once per generated token.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

DecodeStep = Callable[..., torch.Tensor]


def _decode_one_token(model: nn.Module, idx: torch.Tensor, input_pos: torch.Tensor, positions: torch.Tensor | None,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, V) of the next token after ``idx`` (B, 1) written at cache slot ``input_pos`` (1,)."""
    return model(idx, input_pos, positions=positions, mask=mask)[:, -1]


def make_decode_step(model: nn.Module, compile: bool = False, mode: str | None = None,
                     cuda_graph: bool | None = None) -> DecodeStep:
    """The single-token decode step ``step(idx, input_pos, positions, mask) -> logits (B, V)``.

    With ``compile=True`` it is `torch.compile`d with static shapes and ``fullgraph=True`` (gpt-fast style):
    the KV cache has a fixed length and the step always sees (B, 1) tokens, so it compiles once per cache
    shape (Inductor's on-disk cache makes later runs faster, see `enable_compile_cache`). ``mode`` defaults
    to "reduce-overhead" (CUDA graphs) on CUDA and the default mode on CPU. Without compiling, on CUDA
    (``cuda_graph`` None or True) the eager step is captured once per shape into a CUDA graph
    (`CUDAGraphStep`).
    """

    def step(idx, input_pos, positions=None, mask=None):
        return _decode_one_token(model, idx, input_pos, positions, mask)

    device = next(model.parameters(), torch.empty(0)).device
    if not compile:
        if device.type == "cuda" and cuda_graph is not False:
            return CUDAGraphStep(model)
        return step
    enable_compile_cache()
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else None
    options = None
    if device.type == "cpu" and mode is None:
        # store a pointwise result that several kernels read (the normalized activation feeding the row
        # blocks of a matrix-vector product) instead of recomputing it for every weight row: ~15% faster
        options = {"realize_reads_threshold": 1}
    return torch.compile(step, mode=mode, fullgraph=True, dynamic=False, options=options)


def enable_compile_cache(cache_dir: str | Path | None = None) -> Path:
    """Keep Inductor's compiled kernels and FX graphs on disk (default ``~/.cache/litmodel/inductor``, or
    $TORCHINDUCTOR_CACHE_DIR when set), so that a later run with the same model shape skips most of the
    compile work."""
    path = Path(cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                or Path.home() / ".cache" / "litmodel" / "inductor")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor_config  # deferred: ~2 s to import, needed only when compiling

    inductor_config.fx_graph_cache = True
    return path


class CUDAGraphStep:
    """The eager decode step captured into a CUDA graph, once per (batch, cache, mask) shape, then replayed:
    one launch per token instead of hundreds (what makes batch-1 decoding bandwidth-bound on a GPU).

    Inputs are copied into static buffers before each replay; the KV cache is static, so the captured
    kernels write it in place. NOT TESTED in this repository's CI (no GPU): if capturing fails, it warns
    once and runs the eager step instead.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graphs: dict = {}
        self.failed = False

    def _eager(self, idx, input_pos, positions=None, mask=None):
        return _decode_one_token(self.model, idx, input_pos, positions, mask)

    def __call__(self, idx, input_pos, positions=None, mask=None):
        if self.failed:
            return self._eager(idx, input_pos, positions, mask)
        cache = self.model.blocks[0].attn.kv_cache if len(self.model.blocks) else None
        key = (tuple(idx.shape), None if positions is None else tuple(positions.shape),
               None if mask is None else tuple(mask.shape), None if cache is None else cache.k.data_ptr())
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(idx, input_pos, positions, mask)
            except Exception as err:  # pragma: no cover - CUDA only
                warnings.warn(f"CUDA graph capture of the decode step failed ({err}); decoding eagerly")
                self.failed = True
                return self._eager(idx, input_pos, positions, mask)
            self.graphs[key] = entry
        graph, static, out = entry
        for name, value in (("idx", idx), ("input_pos", input_pos), ("positions", positions), ("mask", mask)):
            if value is not None:
                static[name].copy_(value)
        graph.replay()
        return out.clone()

    def _capture(self, idx, input_pos, positions, mask):  # pragma: no cover - CUDA only
        static = {"idx": idx.clone(), "input_pos": input_pos.clone(),
                  "positions": None if positions is None else positions.clone(),
                  "mask": None if mask is None else mask.clone()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (rewrites the same cache slot)
            for _ in range(2):
                self._eager(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._eager(**static)
        return graph, static, out
