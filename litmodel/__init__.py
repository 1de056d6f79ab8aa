"""litmodel: hackable recipes to pretrain, finetune and run LLMs with plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from litmodel.config import Config
from litmodel.gemma import Gemma
from litmodel.gpt import GPT
from litmodel.llama import Llama


def build_model(config: Config) -> nn.Module:
    """The model class for ``config``: `litmodel.gpt.GPT`, `litmodel.gemma.Gemma` or `litmodel.llama.Llama`."""
    if config.family == "gpt":
        return GPT(config)
    if config.family == "gemma":
        return Gemma(config)
    return Llama(config)


class _SkipInit(TorchFunctionMode):
    """Inside the block, `torch.nn.init` functions return their tensor untouched (scoped to the block and thread;
    nothing is patched). On the meta device `init.normal_` would otherwise import torch._dynamo: ~1.5 s."""

    NAMES = frozenset({"uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                       "kaiming_normal_", "xavier_uniform_", "xavier_normal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in self.NAMES:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def build_meta_model(config: Config) -> nn.Module:
    """The model for ``config`` with its parameters on the meta device and no initialisation run: shapes, names
    and ties only, to fill with loaded weights (`load_state_dict(..., assign=True)`) or to read shapes from."""
    with torch.device("meta"), _SkipInit():
        return build_model(config)


__all__ = ["Config", "build_model", "build_meta_model"]
