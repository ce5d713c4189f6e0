"""The check of bpe_encode (notebook 01): GPT-2's merges applied to one word.

The expected pieces come from the course tokenizer (Hugging Face's BPE built from
GPT-2's own files, offline), never from a Python BPE of the course's. Every case
is fixed data, not GPT-2's weights, so every case is seeded (diagnosed the same in
a learner's release).
"""

import json
from typing import Any

from gpt2_course.checks.core import Case, Observation, Outcome
from gpt2_course.checks.registry import Check, register
from gpt2_course.tokenizer import as_bytes, get_tokenizer, merge_ranks, pre_split

# One pre-split word each, chosen so that every mistake of the library gets at least one
# wrong: common words, rare ones, numbers, letters outside ASCII (2, 3 and 4 bytes each),
# runs of one character (ties between equal ranks) and repeated pairs.
WORDS = [
    ("a common word", "Hello"),
    ("a word with its leading space", " the"),
    ("a word of two tokens", " tokenizer"),
    ("a rare word", " antidisestablishmentarianism"),
    ("a rare name", " Okonkwo"),
    ("a year", " 1953"),
    ("a long number", " 3141592653"),
    ("2-byte letters", " naïve"),
    ("3-byte characters", " 東京"),
    ("4-byte emoji", " 🤖🚀"),
    ("a run of one letter", " aaaa"),
    ("a run of zeros", " 0000000"),
    ("a run of punctuation", "!!!!!!!"),
    ("a repeated pair", " banana"),
    ("repeated pairs", " Mississippi"),
    ("whitespace", "\n\n"),
    ("a contraction", "'s"),
    ("one byte", ","),
]


def bpe_cases() -> list[Case]:
    tokenizer, ranks = get_tokenizer(), merge_ranks()
    cases = []
    for what, word in WORDS:
        assert pre_split(word) == [word], f"{word!r} is not one pre-split word"
        expected = [as_bytes(token) for token in tokenizer.tokenize(word)]
        word_bytes = word.encode("utf-8")
        name = f"{what} {json.dumps(word, ensure_ascii=False)}"
        cases.append(Case(name, (word_bytes, ranks), expected=expected, seeded=True))
    return cases


def call_bpe(bpe_encode: Any, case: Case) -> Observation:
    """Call on a copy of the ranks (a learner's code may change it) and report whether
    it changed; bytes pieces travel to the judge as hex strings."""
    word, ranks = case.args
    given = dict(ranks)
    pieces = bpe_encode(word, given)
    if type(pieces) is list and pieces and all(type(p) is bytes for p in pieces):
        pieces = {"pieces": [p.hex() for p in pieces]}
    return Observation(pieces, {"ranks_changed": given != ranks})


def _kind(value: Any) -> str:
    if type(value) in (list, tuple):
        inside = sorted({type(v).__name__ for v in value})
        return f"a {type(value).__name__} of {' and '.join(inside)}" if inside else "an empty list"
    return type(value).__name__


def judge_bpe(outcome: Outcome, case: Case) -> str | None:
    word, expected = case.args[0], case.expected
    output, problem = outcome.output, None
    if not (type(output) is dict and list(output) == ["pieces"]):
        problem = f"returned {_kind(output)}, expected a list of bytes such as {expected!r}"
        if type(output) is list and output and all(type(p) is int for p in output):
            problem += (
                ": iterating over bytes gives ints; make one-byte pieces with bytes([b]) "
                "or word[i : i + 1]"
            )
    else:
        pieces = [bytes.fromhex(p) for p in output["pieces"]]
        if b"".join(pieces) != word:
            problem = (
                f"your pieces {pieces!r} join to {b''.join(pieces)!r}, not to the word "
                f"{word!r}: every byte of the word belongs to exactly one piece"
            )
        elif pieces != expected:
            problem = f"your pieces are {pieces!r}, GPT-2's are {expected!r}"
    if outcome.probes.get("ranks_changed"):
        changed = "your bpe_encode changed the `ranks` dict it was given; leave it as it is"
        problem = f"{problem}; and {changed}" if problem else changed
    return problem


register(
    Check(
        "bpe.bpe_encode",
        "byte-pair encoding of one word",
        bpe_cases,
        call_bpe,
        judge_case=judge_bpe,
    )
)
