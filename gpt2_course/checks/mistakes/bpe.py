"""Common bpe_encode mistakes (notebook 01): each a whole wrong bpe_encode, as a learner
writes it. Several are right on most words; the check's word list holds one that each
gets wrong."""

from collections import Counter
from itertools import pairwise

from gpt2_course.checks.core import Mistake

INF = float("inf")


def single_bytes(word):
    return [bytes([b]) for b in word]


def merge_all(pieces, pair):
    """Every occurrence of `pair` merged, left to right (the right way)."""
    out, i = [], 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            out.append(pieces[i] + pieces[i + 1])
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out


def pairs_of(pieces):
    return list(pairwise(pieces))


def repeat_choosing(choose, merge=merge_all):
    """Merge the pair `choose(pieces, ranks)` picks (None: stop) until it picks none."""

    def bpe_encode(word, ranks):
        pieces = single_bytes(word)
        while len(pieces) > 1:
            pair = choose(pieces, ranks)
            if pair is None:
                break
            pieces = merge(pieces, pair)
        return pieces

    return bpe_encode


def most_frequent(pieces, ranks):
    # training's rule: the pair that occurs most often (of those that can merge)
    counts = Counter(p for p in pairs_of(pieces) if p in ranks)
    return max(counts, key=counts.get) if counts else None


def leftmost(pieces, ranks):
    return next((p for p in pairs_of(pieces) if p in ranks), None)


def highest_rank(pieces, ranks):
    known = [p for p in pairs_of(pieces) if p in ranks]
    return max(known, key=ranks.get) if known else None


def lowest_rank(pieces, ranks):
    known = [p for p in pairs_of(pieces) if p in ranks]
    return min(known, key=ranks.get) if known else None


def merge_rightmost(pieces, pair):
    """One occurrence merged: the rightmost (a tie between equal ranks broken the wrong way)."""
    i = max(j for j, p in enumerate(pairs_of(pieces)) if p == pair)
    return [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]


def merge_without_skipping(pieces, pair):
    """Each occurrence merged, but the scan does not skip the pair's right half."""
    out = [a + b if (a, b) == pair else a for a, b in pairs_of(pieces)]
    return [*out, pieces[-1]]


def min_of_no_pairs(word, ranks):
    pieces = single_bytes(word)
    while True:  # min() of no pairs raises once a single piece is left
        best = min(pairs_of(pieces), key=lambda pair: ranks.get(pair, INF))
        if best not in ranks:
            return pieces
        pieces = merge_all(pieces, best)


def unknown_pairs_first(word, ranks):
    pieces = single_bytes(word)
    while len(pieces) > 1:
        best = min(pairs_of(pieces), key=lambda pair: ranks.get(pair, 0))
        if best not in ranks:
            break
        pieces = merge_all(pieces, best)
    return pieces


def one_merge(word, ranks):
    pieces = single_bytes(word)
    pair = lowest_rank(pieces, ranks)
    return merge_all(pieces, pair) if pair else pieces


def pairs_listed_once(word, ranks):
    pieces = single_bytes(word)
    for pair in sorted(set(pairs_of(pieces)) & ranks.keys(), key=ranks.get):
        pieces = merge_all(pieces, pair)
    return pieces


def each_merge_once(word, ranks):
    pieces = single_bytes(word)
    while (pair := lowest_rank(pieces, ranks)) is not None:
        i = pairs_of(pieces).index(pair)
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
        del ranks[pair]  # "used up": the pair is never merged again (and the caller's dict shrinks)
    return pieces


def int_pieces(word, ranks):
    pieces = list(word)  # iterating over bytes gives ints, which no pair of ranks holds
    while len(pieces) > 1:
        pair = lowest_rank(pieces, ranks)
        if pair is None:
            break
        pieces = merge_all(pieces, pair)
    return pieces


def characters(word, ranks):
    pieces = [ch.encode() for ch in word.decode()]  # one piece per character, not per byte
    while (pair := lowest_rank(pieces, ranks)) is not None:
        pieces = merge_all(pieces, pair)
    return pieces


# fmt: off
MISTAKES = {
    "bpe.bpe_encode": [
        Mistake("most_frequent_pair", "merging the most frequent pair first, which is how training chose the merges; encoding applies the learned merges lowest rank first", repeat_choosing(most_frequent)),
        Mistake("leftmost_pair", "merging the leftmost pair that has a rank, whatever its rank, instead of the lowest-ranked pair", repeat_choosing(leftmost)),
        Mistake("highest_rank_first", "merging the pair with the highest rank first (max instead of min): rank 0 is the merge learned first", repeat_choosing(highest_rank)),
        Mistake("rightmost_of_equals", "merging the rightmost occurrence when the best pair occurs more than once; GPT-2 merges the occurrences left to right", repeat_choosing(lowest_rank, merge_rightmost)),
        Mistake("overlap_merged_twice", "merging overlapping occurrences twice: after merging a pair, skip its right piece, or b\"aaa\" becomes [b\"aa\", b\"aa\"]", repeat_choosing(lowest_rank, merge_without_skipping)),
        Mistake("min_of_no_pairs", "a loop that looks for the best pair even when a single piece is left (a word merged whole, or a one-byte word such as b\",\"): min() of no pairs raises; stop when fewer than two pieces remain", min_of_no_pairs),
        Mistake("unknown_pairs_first", "ranks.get(pair, 0): a pair training never merged gets rank 0, the best of all, so the loop picks it and stops while other pairs could still merge; give an unknown pair an infinite rank (math.inf)", unknown_pairs_first),
        Mistake("one_merge_only", "a single merge: the merging must repeat until no adjacent pair has a rank", one_merge),
        Mistake("pairs_listed_once", "the pairs of the single bytes merged in rank order, but pairs formed by a merge never considered: list the adjacent pairs afresh after every merge", pairs_listed_once),
        Mistake("each_merge_once", "each merge used at most once, deleted from ranks after use: a pair can occur, and merge, more than once in a word (and ranks must stay unchanged)", each_merge_once),
        Mistake("int_pieces", "pieces made with list(word), which gives ints, so no pair is ever found in ranks: make one-byte pieces with bytes([b])", int_pieces),
        Mistake("characters_not_bytes", "starting from one piece per character instead of one per byte: GPT-2's merges start from bytes, and a character outside ASCII is 2 to 4 bytes", characters),
    ],
}
# fmt: on
