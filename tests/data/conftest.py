import pytest
from transformers import AutoTokenizer

from qwen35.data.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The project's small tokenizer, as saved and loaded back (how a run gets it)."""
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)
