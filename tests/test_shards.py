"""Sharded uint16 token files: what `prepare_shards` writes, and what `ShardData` reads back."""

import argparse
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from gpt2_course import shards
from gpt2_course.data import DataError, documents
from gpt2_course.shards import ShardData, open_shards, prepare_shards
from gpt2_course.tokenizer import END_OF_TEXT_ID, get_tokenizer

MAX_TOKENS, VAL_TOKENS, SHARD_TOKENS = 30_000, 4_000, 5_000
SEQ_LEN = 300  # 5,000 = 16 windows + 200 tokens: windows that crossed shards would show
REQUEST = dict(max_tokens=MAX_TOKENS, val_tokens=VAL_TOKENS, shard_tokens=SHARD_TOKENS)


def builtin_texts() -> list[str]:
    dataset, _, _ = documents("builtin", verbose=False)
    return list(dataset["text"])


def token_stream(texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """GPT-2 tokens of the documents, each followed by <|endoftext|>, and each one's length,
    straight from the tokenizer."""
    docs = [
        get_tokenizer()(t, add_special_tokens=False, verbose=False)["input_ids"] + [END_OF_TEXT_ID]
        for t in texts
    ]
    return np.array([t for doc in docs for t in doc], dtype=np.int64), [len(d) for d in docs]


def stored_tokens(folder, split: str) -> list[np.ndarray]:
    manifest = json.loads((folder / "shards.json").read_text())
    return [np.fromfile(folder / e["file"], dtype="<u2") for e in manifest["shards"][split]]


def every_file(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*")) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards") / "builtin"
    assert prepare_shards("builtin", folder, num_proc=1, verbose=False, **REQUEST) == folder
    return folder


@pytest.fixture
def copy(prepared, tmp_path):
    """A copy of the prepared folder that a test may damage."""
    return shutil.copytree(prepared, tmp_path / "copy")


# ------------------------------------------------------------------ what is written


def test_shards_hold_the_token_stream_in_order(prepared):
    manifest = json.loads((prepared / "shards.json").read_text())
    assert manifest["format"] == "gpt2-course-shards" and manifest["version"] == 1
    assert manifest["dtype"] == "uint16" and manifest["byte_order"] == "little"
    assert manifest["tokenizer"] == "gpt2" and manifest["vocab_size"] == 50257
    assert manifest["source_asked"] == manifest["source_used"] == "builtin"
    assert manifest["fallback_reason"] is None
    val, train = manifest["shards"]["val"], manifest["shards"]["train"]
    assert [e["file"] for e in val] == ["val_000000.bin"]
    assert [e["file"] for e in train] == [f"train_{i:06d}.bin" for i in range(6)]
    assert [e["tokens"] for e in val + train] == [4000, 5000, 5000, 5000, 5000, 5000, 1000]
    for entry in val + train:
        assert (prepared / entry["file"]).stat().st_size == 2 * entry["tokens"]

    expected, lengths = token_stream(builtin_texts())
    written = np.concatenate(stored_tokens(prepared, "val") + stored_tokens(prepared, "train"))
    np.testing.assert_array_equal(written, expected[:MAX_TOKENS])
    assert manifest["n_tokens"] == MAX_TOKENS
    # documents counted: those with at least one token written (the last one in part)
    assert manifest["n_documents"] == int(np.searchsorted(np.cumsum(lengths), MAX_TOKENS)) + 1
    assert not list(prepared.glob(".*.tmp"))


def test_text_files_as_the_source_through_the_command_line(tmp_path, capsys):
    texts = ["The first file.\n", "A second, longer file with more words in it. " * 20, "Third."]
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text)
    parser = argparse.ArgumentParser()
    shards.add_cli(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(
        ["shards", "--source", str(tmp_path / "*.txt"), "--out", str(out), "--val-tokens", "20"]
        + ["--shard-tokens", "1_00", "--num-proc", "1"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "your text files (3" in printed and f"--data {out}" in printed
    expected, _ = token_stream(texts)
    written = np.concatenate(stored_tokens(out, "val") + stored_tokens(out, "train"))
    np.testing.assert_array_equal(written, expected)
    assert len(stored_tokens(out, "val")[0]) == 20

    # a request that cannot work: an error message and exit status 1, not a traceback
    args = parser.parse_args(
        ["shards", "--source", str(tmp_path / "none*.txt"), "--out", str(tmp_path / "x")]
    )
    assert args.func(args) == 1
    assert "no text file matches" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # a failed first run leaves no empty folder


def test_token_counts_on_the_command_line():
    assert shards._token_count("10M") == 10_000_000
    assert shards._token_count("1.5B") == 1_500_000_000
    assert shards._token_count("10_000") == 10_000
    with pytest.raises(argparse.ArgumentTypeError, match="not a count of tokens"):
        shards._token_count("lots")


def test_two_processes_write_the_same_files_as_one(prepared, tmp_path, monkeypatch):
    # a fresh cache, so that `datasets` tokenises again (in two processes) instead of reusing
    monkeypatch.setenv("GPT2_COURSE_CACHE", str(tmp_path / "cache"))
    two = prepare_shards("builtin", tmp_path / "two", num_proc=2, verbose=False, **REQUEST)
    assert every_file(two) == every_file(prepared)


def test_a_streamed_corpus_gives_the_same_files_from_two_processes(prepared, tmp_path, monkeypatch):
    # the Hub path (a pool of tokenising processes over a stream), fed local text
    texts = builtin_texts()
    monkeypatch.setattr(shards, "_hub_unavailable", lambda: None)
    monkeypatch.setattr(shards, "_hub_texts", lambda name: iter(texts))
    monkeypatch.setattr(shards, "STREAM_BATCH_DOCS", 4)  # several batches in flight
    folder = prepare_shards("fineweb-edu", tmp_path / "web", num_proc=2, verbose=False, **REQUEST)
    manifest = json.loads((folder / "shards.json").read_text())
    assert manifest["source_used"] == "fineweb-edu" and manifest["fallback_reason"] is None
    assert "FineWeb-Edu" in manifest["description"]
    ours, theirs = every_file(folder), every_file(prepared)
    ours.pop("shards.json"), theirs.pop("shards.json")
    assert ours == theirs


def test_an_interrupted_stream_leaves_no_half_file_and_a_rerun_completes(
    prepared, tmp_path, monkeypatch
):
    texts = builtin_texts()

    def dropped_connection(name):
        yield from texts[:10]
        raise ConnectionError("the Hub went away")

    monkeypatch.setattr(shards, "_hub_unavailable", lambda: None)
    monkeypatch.setattr(shards, "_hub_texts", dropped_connection)
    monkeypatch.setattr(shards, "STREAM_BATCH_DOCS", 2)
    folder = tmp_path / "web"
    with pytest.raises(DataError, match="the Hub went away.*incomplete.*again"):
        prepare_shards("fineweb-edu", folder, num_proc=1, verbose=False, **REQUEST)
    assert not (folder / "shards.json").exists()
    assert not list(folder.glob(".*.tmp"))
    assert {p.stat().st_size for p in folder.glob("*.bin")} <= {2 * VAL_TOKENS, 2 * SHARD_TOKENS}
    with pytest.raises(DataError, match="no shards.json.*interrupted"):
        ShardData(folder, SEQ_LEN)

    monkeypatch.setattr(shards, "_hub_texts", lambda name: iter(texts))
    prepare_shards("fineweb-edu", folder, num_proc=1, verbose=False, **REQUEST)
    ours, theirs = every_file(folder), every_file(prepared)
    ours.pop("shards.json"), theirs.pop("shards.json")
    assert ours == theirs


# ------------------------------------------------------------------ a second preparation


def test_a_second_preparation_is_free(prepared, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    prepare_shards("builtin", prepared, **REQUEST)
    assert "already holds this preparation" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before


def test_a_different_request_into_the_same_folder_is_refused(copy):
    before = every_file(copy)
    with pytest.raises(DataError, match="different preparation.*another --out folder"):
        prepare_shards("builtin", copy, max_tokens=20_000, verbose=False)
    assert every_file(copy) == before


def test_a_folder_of_other_files_is_never_written_into(tmp_path):
    (tmp_path / "thesis.tex").write_text("mine")
    with pytest.raises(DataError, match="other files.*thesis.tex.*empty or new folder"):
        prepare_shards("builtin", tmp_path, verbose=False, **REQUEST)
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_a_damaged_folder_is_prepared_again(prepared, copy, capsys):
    (copy / "train_000002.bin").unlink()
    prepare_shards("builtin", copy, **REQUEST)
    assert "damaged" in capsys.readouterr().out
    assert every_file(copy) == every_file(prepared)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(shard_tokens=0), "shard_tokens must be a whole number >= 1"),
        (dict(val_tokens=0), "val_tokens must be a whole number >= 1"),
        (dict(max_tokens=1000, val_tokens=1000), "leaves nothing to train on"),
        (dict(val_tokens=200_000), "leaves none to train on"),
        (dict(num_proc=0), "num_proc must be"),
    ],
)
def test_bad_requests_are_refused(tmp_path, arguments, message):
    with pytest.raises(DataError, match=message):
        prepare_shards("builtin", tmp_path / "out", verbose=False, **arguments)


def test_a_vocabulary_too_large_for_uint16_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_vocab_size", lambda: 70_000)
    with pytest.raises(DataError, match="70,000 tokens.*uint16"):
        prepare_shards("builtin", tmp_path / "out", verbose=False, **REQUEST)
    with pytest.raises(DataError, match="does not fit in uint16"):
        shards._as_uint16(np.array([5, 65_536]))


# ------------------------------------------------------------------ the Hub, offline


def test_an_unreachable_hub_falls_back_to_builtin_and_says_so(prepared, tmp_path, capsys):
    folder = prepare_shards("openwebtext", tmp_path / "owt", **REQUEST)  # tests run offline
    printed = capsys.readouterr().out
    assert "Cannot stream openwebtext: offline mode is on" in printed
    assert "builtin corpus instead" in printed
    manifest = json.loads((folder / "shards.json").read_text())
    assert manifest["source_asked"] == "openwebtext" and manifest["source_used"] == "builtin"
    assert "offline mode" in manifest["fallback_reason"]
    data = ShardData(folder, SEQ_LEN)
    assert data.source == "builtin" and "offline mode" in data.fallback
    assert "stands in for 'openwebtext'" in data.summary()
    ours, theirs = every_file(folder), every_file(prepared)
    ours.pop("shards.json"), theirs.pop("shards.json")
    assert ours == theirs


def test_a_stand_in_is_replaced_once_the_hub_answers(tmp_path, monkeypatch, capsys):
    request = dict(max_tokens=12_000, val_tokens=1_000, shard_tokens=3_000)
    folder = prepare_shards("fineweb-edu", tmp_path / "web", verbose=False, **request)
    prepare_shards("fineweb-edu", folder, **request)  # still offline: kept, with a note
    assert "holds 'builtin' instead of 'fineweb-edu'" in capsys.readouterr().out

    texts = [f"Web page number {i}. " * 40 for i in range(200)]
    monkeypatch.setattr(shards, "_hub_unavailable", lambda: None)
    monkeypatch.setattr(shards, "_hub_texts", lambda name: iter(texts))
    prepare_shards("fineweb-edu", folder, num_proc=1, **request)
    assert "replacing the 'builtin' stand-in" in capsys.readouterr().out
    manifest = json.loads((folder / "shards.json").read_text())
    assert manifest["source_used"] == "fineweb-edu" and manifest["fallback_reason"] is None
    written = np.concatenate(stored_tokens(folder, "val") + stored_tokens(folder, "train"))
    np.testing.assert_array_equal(written, token_stream(texts)[0][:12_000])


def test_open_shards(prepared, tmp_path):
    data = open_shards(str(prepared), SEQ_LEN, verbose=False)
    assert isinstance(data, ShardData) and data.n_windows("train") == 83
    assert open_shards("builtin", SEQ_LEN, verbose=False) is None  # in memory, as before
    assert open_shards(str(tmp_path), SEQ_LEN, verbose=False) is None
    web = open_shards("fineweb-edu", 64, verbose=False)  # offline: the builtin stand-in
    assert web.folder == shards.cache_dir() / "shards" / "fineweb-edu"
    assert web.source == "builtin" and web.fallback
    # shard files without shards.json: an interrupted preparation, said so (not "no .txt files")
    interrupted = shutil.copytree(prepared, tmp_path / "interrupted")
    (interrupted / "shards.json").unlink()
    with pytest.raises(DataError, match="no shards.json.*interrupted"):
        open_shards(str(interrupted), SEQ_LEN)


# ------------------------------------------------------------------ reading windows


def windows_by_hand(folder, split: str, seq_len: int) -> np.ndarray:
    """Each shard's own windows, the shards one after the other."""
    rows = []
    for tokens in stored_tokens(folder, split):
        n = len(tokens) // seq_len
        rows.append(tokens[: n * seq_len].reshape(n, seq_len))
    return np.concatenate(rows).astype(np.int64)


def test_windows_stay_inside_their_shard(prepared):
    data = ShardData(prepared, SEQ_LEN)
    assert (data.n_windows("val"), data.n_windows("train")) == (13, 5 * 16 + 3)
    assert (data.seq_len, data.source, data.n_tokens) == (SEQ_LEN, "builtin", MAX_TOKENS)
    for split in ("val", "train"):
        expected = windows_by_hand(prepared, split, SEQ_LEN)
        got = data.read(split, torch.arange(data.n_windows(split)))
        assert got.dtype == torch.long and got.shape == (len(expected), SEQ_LEN)
        np.testing.assert_array_equal(got.numpy(), expected)
    # window 16 is the first of train_000001.bin, not tokens 4,800..5,099 of the stream
    train = np.concatenate(stored_tokens(prepared, "train"))
    first_of_shard_1 = data.read("train", torch.tensor([16]))[0].numpy()
    np.testing.assert_array_equal(first_of_shard_1, train[5000:5300])
    assert not np.array_equal(first_of_shard_1, train[16 * SEQ_LEN : 17 * SEQ_LEN])
    # any order, repeats allowed, and nothing else
    picks = torch.tensor([82, 0, 16, 16, 47])
    np.testing.assert_array_equal(
        data.read("train", picks).numpy(), windows_by_hand(prepared, "train", SEQ_LEN)[picks]
    )
    assert data.read("val", torch.tensor([], dtype=torch.long)).shape == (0, SEQ_LEN)
    assert "83 training and 13 validation windows of 300 tokens" in data.summary()


def test_shard_data_travels_to_other_processes_without_its_tokens(prepared):
    data = ShardData(prepared, SEQ_LEN)
    sent = pickle.dumps(data)
    assert len(sent) < 2 * VAL_TOKENS  # the folder's description, not a copy of the shards
    received = pickle.loads(sent)
    picks = torch.tensor([0, 16, 82])
    assert torch.equal(received.read("train", picks), data.read("train", picks))


def test_bad_window_indices_are_refused(prepared):
    data = ShardData(prepared, SEQ_LEN)
    with pytest.raises(IndexError, match="window 83 is out of range.*83 windows.*0 to 82"):
        data.read("train", torch.tensor([3, 83]))
    with pytest.raises(IndexError, match="window -1 is out of range"):
        data.read("val", torch.tensor([-1]))
    with pytest.raises(TypeError, match="must be integers"):
        data.read("val", torch.tensor([1.0]))
    with pytest.raises(IndexError, match="1-D"):
        data.read("val", torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(DataError, match="'train' or 'val'"):
        data.n_windows("test")


def test_a_seq_len_without_windows_is_refused(prepared):
    with pytest.raises(DataError, match="val split .* no window of 4001 tokens.*shorter seq_len"):
        ShardData(prepared, 4001)
    with pytest.raises(DataError, match="seq_len must be at least 2"):
        ShardData(prepared, 1)


def test_samples_are_evenly_spread_and_the_same_every_time(prepared):
    data = ShardData(prepared, SEQ_LEN)
    everything = data.read("train", torch.arange(83)).numpy()
    sample = data.sample("train", 10).numpy()
    np.testing.assert_array_equal(sample, everything[[0, 9, 18, 27, 36, 46, 55, 64, 73, 82]])
    np.testing.assert_array_equal(data.sample("train", 10).numpy(), sample)
    np.testing.assert_array_equal(
        data.sample("val", 100).numpy(), data.read("val", torch.arange(13))
    )


# ------------------------------------------------------------------ damaged folders


def truncate(folder):
    with (folder / "train_000003.bin").open("r+b") as handle:
        handle.truncate(9_998)


def bad_json(folder):
    (folder / "shards.json").write_text('{"format": "gpt2-course-shards", "ver')


def wrong_format(folder):
    manifest = json.loads((folder / "shards.json").read_text())
    (folder / "shards.json").write_text(json.dumps({**manifest, "format": "nanogpt"}))


def escaping_name(folder):
    manifest = json.loads((folder / "shards.json").read_text())
    manifest["shards"]["val"][0]["file"] = "../../etc/passwd"
    (folder / "shards.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            truncate,
            "train_000003.bin holds 9,998 bytes.*5,000 tokens.*truncated.*gpt2-course shards",
        ),
        (lambda f: (f / "val_000000.bin").unlink(), "val_000000.bin is missing.*prepare it again"),
        (bad_json, "not valid JSON"),
        (wrong_format, "not a gpt2-course-shards file.*'nanogpt'"),
        (escaping_name, "bad shard entry"),
        (lambda f: (f / "shards.json").unlink(), "no shards.json.*interrupted.*gpt2-course shards"),
        (lambda f: shutil.rmtree(f), "there is no folder.*gpt2-course shards --source"),
    ],
    ids=["truncated", "deleted", "bad-json", "wrong-format", "escaping-name", "no-json", "no-dir"],
)
def test_damaged_folders_are_refused_with_what_to_do(copy, damage, message):
    damage(copy)
    with pytest.raises(DataError, match=message):
        ShardData(copy, SEQ_LEN)


def test_verify_catches_a_flipped_byte(copy):
    ShardData(copy, SEQ_LEN).verify()  # intact
    path = copy / "train_000004.bin"
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0x01
    path.write_bytes(bytes(raw))
    data = ShardData(copy, SEQ_LEN)  # opening does not hash: the size is right
    with pytest.raises(
        DataError, match="train_000004.bin .* has changed.*prepare the folder again"
    ):
        data.verify()
