"""Text sources -> validated token shards -> deterministic, resumable batches of blocks."""

from lmdistill.data.corpora import CORPORA, SPLITS, Document, corpus_documents
from lmdistill.data.errors import DataError
from lmdistill.data.prepare import PreparedData, load_prepared, prepare, tokenize_documents
from lmdistill.data.sampler import BlockSampler
from lmdistill.data.shards import ShardError, ShardHeader, read_shard, shard_info, write_shard
from lmdistill.data.sources import Source, parse_source

__all__ = [
    "CORPORA",
    "SPLITS",
    "BlockSampler",
    "DataError",
    "Document",
    "PreparedData",
    "ShardError",
    "ShardHeader",
    "Source",
    "corpus_documents",
    "load_prepared",
    "parse_source",
    "prepare",
    "read_shard",
    "shard_info",
    "tokenize_documents",
    "write_shard",
]
