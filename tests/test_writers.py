"""Output files: JSON Lines and CSV resume with odd bytes, foreign files refused, leftovers cleaned."""

from __future__ import annotations

import errno
import json
import os
import tempfile

import pytest

from safellava.errors import UsageError
from safellava.writers import CsvWriter, JsonlWriter


def test_jsonl_keeps_records_with_unicode_line_separators(tmp_path):
    path = tmp_path / "c.jsonl"
    writer = JsonlWriter(path)
    writer.write([{"image": "a.png", "caption": "one\u2028two"}, {"image": "b.png", "caption": "x\u2029y"}])
    writer.close()
    assert "\u2028" not in path.read_text(encoding="utf-8")  # written escaped
    path.write_bytes(path.read_bytes() + '{"image": "c.png", "caption": "raw\u2028sep"}\n'.encode())
    reread = JsonlWriter(path)
    reread.load()
    assert all(reread.is_done(name) for name in ("a.png", "b.png", "c.png"))
    assert [json.loads(line)["caption"] for line in path.read_bytes().split(b"\n")[:-1]] == [
        "one\u2028two",
        "x\u2029y",
        "raw\u2028sep",
    ]


def test_jsonl_write_cut_inside_a_utf8_character_is_cut_off(tmp_path):
    path = tmp_path / "c.jsonl"
    good = '{"image": "a.png", "caption": "café"}\n'.encode()
    path.write_bytes(good + '{"image": "b.png", "caption": "café"}'.encode()[:-3])
    writer = JsonlWriter(path)
    writer.load()
    assert writer.is_done("a.png") and not writer.is_done("b.png")
    assert path.read_bytes() == good


def test_jsonl_with_a_foreign_line_in_the_middle_is_refused_untouched(tmp_path):
    path = tmp_path / "c.jsonl"
    content = b'{"image": "a.png"}\nnot json at all\n{"image": "b.png"}\n'
    path.write_bytes(content)
    with pytest.raises(UsageError, match="line 2 is not a JSON record"):
        JsonlWriter(path).load()
    assert path.read_bytes() == content


def test_csv_keeps_crlf_inside_captions_when_cutting_a_torn_record(tmp_path):
    path = tmp_path / "c.csv"
    fields = ("image", "caption")
    whole = b'image,caption\na.png,"one\r\ntwo"\nb.png,"three\r\nfour"\n'
    path.write_bytes(whole + b'c.png,"torn')
    writer = CsvWriter(path, fields)
    writer.load()
    assert path.read_bytes() == whole
    assert writer.is_done("b.png") and not writer.is_done("c.png")
    again = CsvWriter(path, fields)
    again.load()
    assert again.is_done("a.png") and again.is_done("b.png")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"name,score\nada,3\n", "its header is not image,caption"),
        (b'image,caption\na.png,"x"\nb.png\nc.png,"y"\n', "row 3 does not have 2 columns"),
    ],
)
def test_csv_of_someone_else_is_refused_untouched(tmp_path, content, message):
    path = tmp_path / "c.csv"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        CsvWriter(path, ("image", "caption")).load()
    assert path.read_bytes() == content


def _failing(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.ENOSPC, "free some space, then rerun"),
        (
            errno.EROFS,
            "choose another --output (a rerun resumes where this one stopped) in a writable folder",
        ),
    ],
)
@pytest.mark.parametrize("fmt", ["jsonl", "txt"])
def test_a_full_disk_or_a_read_only_folder_names_the_file_and_the_fix(
    tiny, images, tmp_path, capsys, monkeypatch, code, fix, fmt
):
    from safellava.cli import main

    out = tmp_path / ("c.jsonl" if fmt == "jsonl" else "captions")
    if fmt == "jsonl":
        monkeypatch.setattr(os, "fsync", _failing(code))
        failed = out
    else:
        monkeypatch.setattr(tempfile, "mkstemp", _failing(code))
        failed = out / "one.txt"
    flags = [
        "--model",
        str(tiny.llava),
        "--vision-tower",
        str(tiny.safeclip),
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
    ]
    exit_code = main(
        ["batch", str(images[0].parent), *flags, "--format", fmt, "-o", str(out), "--batch-size", "3"]
    )
    err = capsys.readouterr().err
    assert exit_code == 1
    assert err.splitlines()[-1] == f"safellava: error: cannot write {failed}: {os.strerror(code)}: {fix}"


def test_a_transcript_that_cannot_be_written_names_the_file(safe_llava, tmp_path, monkeypatch):
    from safellava.chat import ChatSession
    from safellava.errors import OutputError

    monkeypatch.setattr(tempfile, "mkstemp", _failing(errno.ENOSPC))
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'talk.json'}: No space left on device"):
        ChatSession(safe_llava, safe_llava.generation_options()).save(tmp_path / "talk.json")


def test_overwriting_an_older_csv_writes_todays_columns(tmp_path):
    from safellava.writers import CSV_FIELDS, LEGACY_CSV_FIELDS

    path = tmp_path / "old.csv"
    path.write_text(",".join(LEGACY_CSV_FIELDS) + "\n" + "a.png,cap,p,m,t,,,none,\n")
    resumed = CsvWriter(path)
    resumed.load()
    assert resumed.fields == LEGACY_CSV_FIELDS and resumed.is_done("a.png")  # resuming keeps its columns
    fresh = CsvWriter(path)
    fresh.load()
    fresh.reset()
    fresh.write([{"image": "b.png", "caption": "new"}])
    fresh.close()
    assert path.read_text().splitlines()[0] == ",".join(CSV_FIELDS)


def test_a_csv_that_does_not_end_in_a_record_is_refused_quickly(tmp_path):
    path = tmp_path / "edited.csv"
    from safellava.writers import CSV_FIELDS

    lines = [",".join(CSV_FIELDS), 'a.png,"an unclosed quote'] + ["x" * 10 for _ in range(5000)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UsageError, match="do not end a record"):
        CsvWriter(path).load()
