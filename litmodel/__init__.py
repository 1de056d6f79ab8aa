"""litmodel: hackable recipes to pretrain, finetune and run LLMs with plain PyTorch."""

from __future__ import annotations

import torch.nn as nn

from litmodel.config import Config


def build_model(config: Config) -> nn.Module:
    """The model class for ``config``: `litmodel.gpt.GPT`, `litmodel.gemma.Gemma` or `litmodel.llama.Llama`."""
    if config.family == "gpt":
        from litmodel.gpt import GPT

        return GPT(config)
    if config.family == "gemma":
        from litmodel.gemma import Gemma

        return Gemma(config)
    from litmodel.llama import Llama

    return Llama(config)


__all__ = ["Config", "build_model"]
