"""Reading hostile submissions: zips whose headers lie or whose names point anywhere,
folders with links and huge files. Each refusal must say clearly why."""

import os
import struct
import zipfile
from pathlib import Path

import pytest

from gpt2_course.grading import submissions
from gpt2_course.grading.submissions import (
    MAX_ZIP_BYTES,
    SubmissionError,
    copy_exercises,
    extract_zip,
    find_exercises,
)

MiB = 2**20


def make_zip(path: Path, entries: dict[str, str | bytes], **kwargs) -> Path:
    with zipfile.ZipFile(path, "w", **kwargs) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def patch_headers(path: Path, **fields: int) -> None:
    """Rewrite fields of every entry's local and central headers, as a forger would."""
    local = {"flag": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"), "size": (22, "<I")}
    central = {"flag": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "size": (24, "<I")}
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        starts, position = [i.header_offset for i in archive.infolist()], archive.start_dir
    for _ in starts:  # walk the central directory, one record per entry
        for field, value in fields.items():
            offset, fmt = central[field]
            struct.pack_into(fmt, data, position + offset, value)
        name, extra, comment = struct.unpack_from("<HHH", data, position + 28)
        position += 46 + name + extra + comment
    for start in starts:
        for field, value in fields.items():
            offset, fmt = local[field]
            struct.pack_into(fmt, data, start + offset, value)
    path.write_bytes(bytes(data))


def refused(archive: Path, into: Path) -> str:
    """The message of the refusal, which names the zip and never a temporary path."""
    with pytest.raises(SubmissionError) as caught:
        extract_zip(archive, into)
    message = str(caught.value)
    assert message.startswith(archive.name)
    assert str(archive.parent) not in message and str(into) not in message
    return message


def bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- zips that unpack


def test_an_ordinary_zip_unpacks_without_macos_junk(tmp_path):
    archive = make_zip(
        tmp_path / "alice.zip",
        {
            "alice/": "",
            "alice/layernorm.py": "x = 1\n",
            "alice/notes: week 1.txt": "colons and spaces are fine",
            "alice/sub/deep.py": "",
            "__MACOSX/alice/._layernorm.py": b"\0\5\26\7",
            "alice/.DS_Store": b"\0\0\0\1Bud1",
        },
        compression=zipfile.ZIP_DEFLATED,
    )
    into = extract_zip(archive, tmp_path / "out")
    files = sorted(p.relative_to(into).as_posix() for p in into.rglob("*") if p.is_file())
    assert files == ["alice/layernorm.py", "alice/notes: week 1.txt", "alice/sub/deep.py"]
    assert (into / "alice" / "layernorm.py").read_text() == "x = 1\n"
    assert not (into / "__MACOSX").exists()


def test_windows_backslashes_are_folders(tmp_path):
    archive = make_zip(tmp_path / "win.zip", {"bob\\layernorm.py": "x = 1\n"})
    into = extract_zip(archive, tmp_path / "out")
    assert (into / "bob" / "layernorm.py").read_text() == "x = 1\n"


# ---------------------------------------------------------------- sizes


def test_a_zip_bomb_is_refused_without_writing_past_the_limit(tmp_path):
    archive = tmp_path / "bomb.zip"
    zeros = bytes(MiB)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z, z.open("bomb.bin", "w") as f:
        for _ in range(200):
            f.write(zeros)
    assert archive.stat().st_size < MiB  # 200 MiB in a few hundred kilobytes
    assert refused(archive, tmp_path / "out") == "bomb.zip unpacks to more than 50 MiB"
    assert bytes_under(tmp_path / "out") <= MAX_ZIP_BYTES


def test_many_entries_that_add_up_past_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(submissions, "MAX_ZIP_BYTES", 1000)
    entries = {f"part{i}.py": "#" * 600 for i in range(3)}
    archive = make_zip(tmp_path / "sum.zip", entries, compression=zipfile.ZIP_DEFLATED)
    assert refused(archive, tmp_path / "out") == "sum.zip unpacks to more than 1000 bytes"
    assert bytes_under(tmp_path / "out") <= 1000


def test_a_header_that_lies_about_the_size_is_caught(tmp_path):
    archive = make_zip(
        tmp_path / "liar.zip", {"layernorm.py": bytes(10 * MiB)}, compression=zipfile.ZIP_DEFLATED
    )
    patch_headers(archive, size=100)  # claims 100 bytes; zipfile stops there, and the CRC fails
    message = refused(archive, tmp_path / "out")
    assert message == (
        "liar.zip could not be unpacked at 'layernorm.py': its data is corrupted "
        "(Bad CRC-32 for file 'layernorm.py')"
    )
    assert bytes_under(tmp_path / "out") <= 100


def test_a_zip_larger_than_the_limit_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(submissions, "MAX_ZIP_BYTES", 100)
    archive = make_zip(tmp_path / "big.zip", {"layernorm.py": "#" * 200})
    assert refused(archive, tmp_path / "out") == "big.zip is larger than 100 bytes"


# ---------------------------------------------------------------- names


def test_too_many_entries(tmp_path):
    archive = make_zip(tmp_path / "many.zip", {f"f{i}.py": "" for i in range(2001)})
    message = refused(archive, tmp_path / "out")
    assert message == "many.zip holds 2001 entries, more than the 2000 allowed"
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_paths_too_deep_are_refused_and_twelve_levels_are_fine(tmp_path):
    ok = make_zip(tmp_path / "ok.zip", {"a/" * 11 + "x.py": ""})
    assert (extract_zip(ok, tmp_path / "ok").joinpath(*["a"] * 11, "x.py")).is_file()
    deep = make_zip(tmp_path / "deep.zip", {"a/" * 12 + "x.py": ""})
    message = refused(deep, tmp_path / "out")
    assert message.startswith("deep.zip contains a path more than 12 levels deep: 'a/a/a/")


def test_long_names_are_refused(tmp_path):
    part = make_zip(tmp_path / "part.zip", {"x" * 256 + ".py": ""})
    message = refused(part, tmp_path / "out")
    assert message == f"part.zip contains a name longer than 255 bytes: '{'x' * 80}...'"
    whole = make_zip(tmp_path / "whole.zip", {"/".join(["y" * 200] * 6): ""})
    message = refused(whole, tmp_path / "out")
    assert message.startswith("whole.zip contains a path longer than 1024 bytes: 'yyy")


@pytest.mark.parametrize(
    "name",
    [
        "../escaped.py",
        "a/../../escaped.py",
        "a\\..\\..\\escaped.py",
        "/etc/escaped.py",
        "\\escaped.py",
        "\\\\server\\share\\escaped.py",
        "C:/escaped.py",
        "c:escaped.py",
    ],
)
def test_names_that_leave_the_folder_are_refused(tmp_path, name):
    archive = make_zip(tmp_path / "evil.zip", {"ok.py": "", name: "print('gotcha')"})
    assert refused(archive, tmp_path / "out") == f"evil.zip contains an unsafe path: {name!r}"
    assert not (tmp_path / "out").exists()  # not even the harmless entry was written
    assert not list(tmp_path.parent.rglob("escaped.py"))


def test_symbolic_links_are_refused(tmp_path):
    link = zipfile.ZipInfo("layernorm.py")
    link.external_attr = 0o120777 << 16
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(link, "/etc/passwd")
    assert refused(archive, tmp_path / "out") == "link.zip contains a symbolic link: 'layernorm.py'"


def test_a_link_already_in_the_target_cannot_lead_out(tmp_path):
    outside, into = tmp_path / "outside", tmp_path / "out"
    outside.mkdir()
    into.mkdir()
    (into / "sub").symlink_to(outside)
    archive = make_zip(tmp_path / "through.zip", {"sub/x.py": ""})
    assert refused(archive, into) == "through.zip contains an unsafe path: 'sub/x.py'"
    assert not list(outside.iterdir())


def test_the_same_file_twice_is_refused(tmp_path):
    archive = tmp_path / "twice.zip"
    with zipfile.ZipFile(archive, "w") as z, pytest.warns(UserWarning, match="Duplicate"):
        z.writestr("layernorm.py", "a = 1")
        z.writestr("./layernorm.py", "a = 2")
        z.writestr("layernorm.py", "a = 3")
    assert refused(archive, tmp_path / "out") == "twice.zip contains 'layernorm.py' twice"


def test_a_file_where_a_folder_should_be(tmp_path):
    archive = make_zip(tmp_path / "clash.zip", {"a": "", "a/b.py": ""})
    message = refused(archive, tmp_path / "out")
    assert message == "clash.zip contains 'a' both as a file and as a folder"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- broken zips


def test_not_a_zip_and_a_truncated_zip(tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_text("this is not a zip")
    message = refused(fake, tmp_path / "out")
    assert message == "fake.zip is not a readable zip file (File is not a zip file)"
    real = make_zip(tmp_path / "cut.zip", {"layernorm.py": "x = 1\n" * 100})
    real.write_bytes(real.read_bytes()[:-30])
    assert refused(real, tmp_path / "out").startswith("cut.zip is not a readable zip file")


def test_a_missing_zip_names_only_the_file(tmp_path):
    message = refused(tmp_path / "gone.zip", tmp_path / "out")
    assert message == "gone.zip is not a readable zip file (No such file or directory)"


def test_corrupted_data(tmp_path):
    archive = make_zip(
        tmp_path / "rot.zip", {"layernorm.py": os.urandom(4096)}, compression=zipfile.ZIP_STORED
    )
    data = bytearray(archive.read_bytes())
    data[100:110] = bytes(10)  # inside the stored data, after the 42-byte local header
    archive.write_bytes(bytes(data))
    message = refused(archive, tmp_path / "out")
    assert message == (
        "rot.zip could not be unpacked at 'layernorm.py': its data is corrupted "
        "(Bad CRC-32 for file 'layernorm.py')"
    )


def test_corrupted_deflate_stream(tmp_path):
    archive = make_zip(
        tmp_path / "rot.zip", {"layernorm.py": "x = 1\n" * 1000}, compression=zipfile.ZIP_DEFLATED
    )
    with zipfile.ZipFile(archive) as z:
        info = z.infolist()[0]
        start = info.header_offset + 30 + len(info.filename)
    data = bytearray(archive.read_bytes())
    data[start] = 0xFF  # block type 3: reserved, an invalid deflate block
    archive.write_bytes(bytes(data))
    message = refused(archive, tmp_path / "out")
    assert message == (
        "rot.zip could not be unpacked at 'layernorm.py': "
        "its data is corrupted (Error -3 while decompressing data: invalid block type)"
    )


def test_an_encrypted_entry(tmp_path):
    archive = make_zip(tmp_path / "locked.zip", {"layernorm.py": "x = 1\n"})
    patch_headers(archive, flag=0x1)  # "encrypted", as a password-protected zip says
    assert refused(archive, tmp_path / "out") == (
        "locked.zip could not be unpacked at 'layernorm.py': "
        "it is password-protected; submit a zip without a password"
    )


def test_an_unknown_compression_method(tmp_path):
    archive = make_zip(tmp_path / "odd.zip", {"layernorm.py": "x = 1\n"})
    patch_headers(archive, method=99)  # AES, which zipfile cannot read
    assert refused(archive, tmp_path / "out") == (
        "odd.zip could not be unpacked at 'layernorm.py': it uses a compression method "
        "the grader cannot read (That compression method is not supported)"
    )


# ---------------------------------------------------------------- finding the exercises


def test_find_exercises_looks_past_macos_and_dot_folders(tmp_path):
    for junk in ("__MACOSX", ".git", ".ipynb_checkpoints"):
        (tmp_path / junk).mkdir()
        (tmp_path / junk / "layernorm.py").write_text("")
    (tmp_path / "alice" / "gpt2_course" / "exercises").mkdir(parents=True)
    (tmp_path / "alice" / "gpt2_course" / "exercises" / "layernorm.py").write_text("")
    assert find_exercises(tmp_path) == tmp_path / "alice" / "gpt2_course" / "exercises"


def test_exercise_files_in_two_places_are_refused(tmp_path):
    (tmp_path / "gpt2_course" / "exercises").mkdir(parents=True)
    (tmp_path / "gpt2_course" / "exercises" / "layernorm.py").write_text("")
    (tmp_path / "mlp.py").write_text("")
    with pytest.raises(SubmissionError) as caught:
        find_exercises(tmp_path)
    assert str(caught.value) == (
        "exercise files were found in both gpt2_course/exercises/ and the top folder: "
        "keep a single copy so that it is clear which one is graded"
    )


def test_a_wrapping_folder_and_the_top_folder_are_two_places(tmp_path):
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "attention.py").write_text("")
    (tmp_path / "attention.py").write_text("")
    with pytest.raises(SubmissionError, match="found in both the top folder and alice/:"):
        find_exercises(tmp_path)


def test_find_exercises_without_exercise_files(tmp_path):
    (tmp_path / "notes.py").write_text("")
    with pytest.raises(SubmissionError, match="holds no exercise files: expected files such as"):
        find_exercises(tmp_path)


# ---------------------------------------------------------------- the private copy


def test_copy_exercises_copies_top_level_python_files_only(tmp_path):
    exercises = tmp_path / "submission"
    (exercises / "sub").mkdir(parents=True)
    (exercises / "layernorm.py").write_text("x = 1\n")
    (exercises / "__init__.py").write_text("")
    (exercises / "notes.txt").write_text("not code")
    (exercises / "._layernorm.py").write_bytes(b"\0\5\26\7")
    (exercises / "sub" / "helper.py").write_text("")
    (exercises / "folder.py").mkdir()
    os.mkfifo(exercises / "pipe.py")  # reading it would hang the grader
    before = sorted(p.name for p in exercises.rglob("*"))
    copy = copy_exercises(exercises, tmp_path / "copy")
    assert copy == tmp_path / "copy"
    assert sorted(p.name for p in copy.iterdir()) == ["__init__.py", "layernorm.py"]
    assert (copy / "layernorm.py").read_text() == "x = 1\n"
    assert sorted(p.name for p in exercises.rglob("*")) == before


def test_copy_exercises_refuses_links(tmp_path):
    exercises = tmp_path / "submission"
    exercises.mkdir()
    (tmp_path / "secret.py").write_text("")
    (exercises / "layernorm.py").symlink_to(tmp_path / "secret.py")
    with pytest.raises(SubmissionError) as caught:
        copy_exercises(exercises, tmp_path / "copy")
    assert str(caught.value) == (
        "layernorm.py is a symbolic link: submit the file itself, not a link to it"
    )


def test_copy_exercises_refuses_big_files(tmp_path):
    exercises = tmp_path / "submission"
    exercises.mkdir()
    (exercises / "layernorm.py").write_bytes(b"#" * (MiB + 1))
    with pytest.raises(SubmissionError) as caught:
        copy_exercises(exercises, tmp_path / "copy")
    assert str(caught.value) == (
        "layernorm.py is larger than 1 MiB: an exercise file is a few kilobytes of code"
    )
    (exercises / "layernorm.py").write_bytes(b"#" * MiB)  # exactly the limit is fine
    assert (copy_exercises(exercises, tmp_path / "copy") / "layernorm.py").stat().st_size == MiB


def test_copy_exercises_refuses_too_many_files(tmp_path):
    exercises = tmp_path / "submission"
    exercises.mkdir()
    for i in range(51):
        (exercises / f"m{i}.py").write_text("")
    with pytest.raises(SubmissionError) as caught:
        copy_exercises(exercises, tmp_path / "copy")
    assert str(caught.value) == "the exercise folder holds 51 .py files, more than the 50 allowed"
