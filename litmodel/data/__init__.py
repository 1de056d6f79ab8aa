"""Pretraining data: token shards (format, writer, memory-mapped reader), corpus sources, preparation, loaders.

```python
from litmodel.data import prepare_corpus, stdlib_corpus, PretrainDataLoader, ValDataLoader
prepare_corpus(stdlib_corpus(), tokenizer_dir, "data/stdlib")   # -> data/stdlib/{train,val}/
loader = PretrainDataLoader("data/stdlib/train", block_size=256, micro_batch_size=8, seed=0)
x, y = next(loader)                                               # (8, 256) LongTensors, y = x shifted
```
"""

from litmodel.data.prepare import (
    DEFAULT_SEED,
    DEFAULT_VAL_FRACTION,
    assign_splits,
    default_num_workers,
    ensure_prepared,
    is_prepared,
    prepare_and_report,
    prepare_corpus,
    split_score,
)
from litmodel.data.pretrain import PretrainDataLoader, ValDataLoader, num_windows
from litmodel.data.shards import (
    DEFAULT_SHARD_TOKENS,
    ShardWriter,
    TokenShards,
    check_tokenizer_match,
    choose_dtype,
    read_index,
    tokenizer_hash,
)
from litmodel.data.sources import Corpus, corpus_from_documents, hub_corpus, stdlib_corpus, text_dir_corpus

__all__ = [
    "DEFAULT_SEED", "DEFAULT_SHARD_TOKENS", "DEFAULT_VAL_FRACTION", "Corpus", "PretrainDataLoader", "ShardWriter",
    "TokenShards", "ValDataLoader", "assign_splits", "check_tokenizer_match", "choose_dtype", "corpus_from_documents",
    "default_num_workers", "ensure_prepared", "is_prepared", "hub_corpus", "num_windows", "prepare_and_report",
    "prepare_corpus", "read_index", "split_score",
    "stdlib_corpus", "text_dir_corpus", "tokenizer_hash",
]
