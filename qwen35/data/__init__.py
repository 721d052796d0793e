"""The data pipeline: local files → chat-templated tokens with assistant-only loss → packed rows.

See docs/data.md for the formats, the Qwen3.5 chat template facts and the config fields.
"""

from qwen35.data.dataset import DATA_DEFAULTS, Datasets, DataStats, build_datasets
from qwen35.data.formats import DataError, MalformedRecord, MissingDataFile, parse_sources
from qwen35.data.loader import PackedLoader
from qwen35.data.pack import PackedDataset, collate
from qwen35.data.render import ChatRenderer
from qwen35.data.task import build_task, exact_match, extract_answer, load_eval_examples, score
from qwen35.data.tokenizer import build_tokenizer

__all__ = [
    "DATA_DEFAULTS", "Datasets", "DataStats", "build_datasets", "DataError", "MalformedRecord",
    "MissingDataFile", "parse_sources",
    "PackedLoader", "PackedDataset", "collate", "ChatRenderer", "build_task", "exact_match",
    "extract_answer", "load_eval_examples", "score", "build_tokenizer",
]
