"""litmodel: hackable recipes to pretrain, finetune and run LLMs with plain PyTorch."""
