"""Fixtures for rlmesh.data tests: a character-level tokenizer built in code and verl-format rows."""

from collections.abc import Callable
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# Every character the test prompts and the chat template use; anything else maps to <unk>.
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 +-*/=?.,:;'\"#$\\{}()\n"
# A template that makes the rendering visible: role tags around each message, then the generation prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "<bos>": 3}
    for character in CHARACTERS + "<>":
        vocab.setdefault(character, len(vocab))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    model.decoder = decoders.Fuse()  # characters back to text without separators
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<bos>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    return build_char_tokenizer()


def verl_row(question: str, answer: Any, data_source: str = "arith", **extra: Any) -> dict[str, Any]:
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": question}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": "train", **extra},
    }


@pytest.fixture
def make_row() -> Callable[..., dict[str, Any]]:
    """verl_row(question, answer, data_source="arith", **extra_info) -> one verl-format row."""
    return verl_row


@pytest.fixture
def make_tokenizer() -> Callable[[], PreTrainedTokenizerFast]:
    """A fresh tokenizer per call, for tests that change its chat template."""
    return build_char_tokenizer
