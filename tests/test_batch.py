"""``safellava batch``: discovery, formats, resume, sharding, failures, a real kill -9, OOM splits."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safellava import batch as batch_module
from safellava.batch import BatchCaptioner, BatchOptions, discover, open_writer, parse_shard, plan_folder
from safellava.chat import ChatSession
from safellava.cli import main
from safellava.errors import UsageError
from safellava.generate import OOM_MESSAGE
from safellava.records import CaptionRecord
from safellava.writers import CsvWriter, JsonlWriter, SidecarWriter, ordinary_mode

from .conftest import MAX_NEW_TOKENS

GOOD = sorted(
    [
        "cmyk.jpg",
        "gray.png",
        "nested/deeper/palette.gif",
        "nested/rgba.png",
        "nested/rotated.jpg",
        "photo.JPG",
        "café ☕.png",
    ]
)
BAD = {
    "corrupt.jpg": "corrupt or truncated",
    "empty.png": "empty file",
    "nested/notes.jpg": "not an image file",
    "random.webp": "not an image file",
}


def _noise(seed: int, size=(40, 30)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A folder with nested subfolders, odd image modes and every kind of bad file."""
    root = tmp_path / "images"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / ".cache").mkdir()
    Image.fromarray(_noise(0)).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(_noise(1)).convert("L").save(root / "gray.png")
    Image.fromarray(_noise(2)).convert("P").save(root / "nested/deeper/palette.gif")
    Image.fromarray(_noise(3)).convert("RGBA").save(root / "nested/rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_noise(4)).save(root / "nested/rotated.jpg", exif=exif)
    Image.fromarray(_noise(5)).save(root / "photo.JPG")
    Image.fromarray(_noise(6)).save(root / "café ☕.png")
    Image.fromarray(_noise(7)).save(root / ".cache/hidden.png")
    full = root / "full.jpg"
    Image.fromarray(_noise(8, (64, 64))).save(full, quality=95)
    (root / "corrupt.jpg").write_bytes(full.read_bytes()[:400])
    full.unlink()
    (root / "empty.png").write_bytes(b"")
    (root / "nested/notes.jpg").write_text("shopping list: milk, eggs")
    (root / "random.webp").write_bytes(os.urandom(300))
    (root / "readme.txt").write_text("not an image extension")
    (root / "nested" / "loop").symlink_to("..")
    return root


def _model_flags(tiny):
    return ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]


def _batch(capsys, tiny, folder, *flags):
    code = main(["batch", str(folder), *_model_flags(tiny), "--max-new-tokens", str(MAX_NEW_TOKENS), *flags])
    out, err = capsys.readouterr()
    return code, out, err


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_discovery_is_sorted_skips_hidden_and_survives_symlink_loops(dataset):
    names = [item.name for item in discover(dataset, recursive=True)]
    assert names == sorted(GOOD + list(BAD))
    assert [i.name for i in discover(dataset)] == sorted(n for n in GOOD + list(BAD) if "/" not in n)
    assert [i.name for i in discover(dataset, True, ("gif", "WEBP"))] == [
        "nested/deeper/palette.gif",
        "random.webp",
    ]


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv"])
def test_every_format_records_good_images_and_lists_failures(tiny, dataset, tmp_path, capsys, fmt):
    output = tmp_path / f"captions.{fmt}"
    flags = ["-r", "--format", fmt] + ([] if fmt == "txt" else ["--output", str(output)])
    code, _, err = _batch(capsys, tiny, dataset, *flags, "--batch-size", "3")
    assert code == 1
    if fmt == "txt":
        captions = {n: (dataset / n).with_suffix(".txt").read_text(encoding="utf-8") for n in GOOD}
        assert all(text.strip() and text.endswith("\n") for text in captions.values())
        errors_path = dataset / "safellava-errors.jsonl"
    else:
        if fmt == "jsonl":
            records = _jsonl(output)
        else:
            with output.open(newline="", encoding="utf-8") as file:
                records = list(csv.DictReader(file))
        assert [r["image"] for r in records] == GOOD
        for record in records:
            assert record["caption"]
            assert record["model"] == str(tiny.llava)
            assert record["vision_tower"] == str(tiny.safeclip)
            assert record["prompt"] == "Provide a one-sentence caption for the provided image."
        # captions.jsonl -> captions.errors.jsonl, captions.csv -> captions.csv.errors.jsonl: never shared.
        errors_path = tmp_path / ("captions.errors.jsonl" if fmt == "jsonl" else "captions.csv.errors.jsonl")
    failures = {r["image"]: r["error"] for r in _jsonl(errors_path)}
    assert set(failures) == set(BAD)
    for name, reason in BAD.items():
        assert reason in failures[name]
    assert f"failures are listed in {errors_path}" in err
    assert "captioned 7, skipped 0 already captioned, failed 4" in err


def test_rerun_skips_done_retries_failed_and_overwrite_redoes(tiny, dataset, tmp_path, capsys):
    output = tmp_path / "c.jsonl"
    flags = ["-r", "--format", "jsonl", "--output", str(output)]
    _batch(capsys, tiny, dataset, *flags)
    first = _jsonl(output)
    (dataset / "empty.png").unlink()
    Image.fromarray(_noise(9)).save(dataset / "random.webp")  # fixed between runs
    code, _, err = _batch(capsys, tiny, dataset, *flags)
    assert code == 1
    assert "captioned 1, skipped 7 already captioned, failed 2" in err
    assert _jsonl(output)[:7] == first
    assert [r["image"] for r in _jsonl(output)] == [*GOOD, "random.webp"]
    assert {r["image"] for r in _jsonl(tmp_path / "c.errors.jsonl")} == {"corrupt.jpg", "nested/notes.jpg"}
    code, _, err = _batch(capsys, tiny, dataset, *flags, "--overwrite")
    assert "captioned 8, skipped 0" in err
    assert sorted(r["image"] for r in _jsonl(output)) == sorted([*GOOD, "random.webp"])


def test_txt_mirrors_into_an_output_folder_with_prefix_suffix_and_prompt_file(
    tiny, dataset, tmp_path, capsys
):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Describe the photo.\n")
    out = tmp_path / "mirror"
    code, _, _ = _batch(
        capsys, tiny, dataset, "-r", "--output", str(out), "--caption-ext", "caption",
        "--prefix", "photo, ", "--suffix", " [safe]", "--prompt-file", str(prompt),
    )  # fmt: skip
    assert code == 1
    assert not list(dataset.rglob("*.caption"))
    for name in GOOD:
        text = (out / name).with_suffix(".caption").read_text(encoding="utf-8")
        assert text.startswith("photo, ") and text.endswith(" [safe]\n")
    assert (out / "safellava-errors.jsonl").exists()


def test_caption_files_never_escape_and_never_collide(tmp_path):
    writer = SidecarWriter(tmp_path, tmp_path / "out")
    assert writer.target("a/b.jpg") == (tmp_path / "out" / "a" / "b.txt").resolve()
    with pytest.raises(ValueError, match="outside"):
        writer.target("../../etc/passwd.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "same.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "same.png")
    options = BatchOptions(root=tmp_path)
    plan = plan_folder(options, open_writer(options))
    assert [i.name for i in plan.todo] == ["same.jpg"]
    assert [(i.name, why) for i, why in plan.refused] == [
        ("same.png", "its caption file same.txt is also same.jpg's")
    ]


def test_shards_cover_every_file_exactly_once(dataset, tmp_path):
    everything = [i.name for i in discover(dataset, recursive=True)]
    seen = []
    for k in (1, 2, 3):
        options = BatchOptions(
            root=dataset, recursive=True, format="jsonl", output=tmp_path / f"{k}.jsonl", shard=(k, 3)
        )
        seen += [i.name for i in plan_folder(options, open_writer(options, dry_run=True)).todo]
    assert sorted(seen) == everything
    assert parse_shard("2/8") == (2, 8)
    for bad in ("0/3", "4/3", "2", "a/b"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def test_dry_run_lists_and_changes_nothing(tiny, dataset, tmp_path, capsys):
    output = tmp_path / "c.jsonl"
    output.write_text(json.dumps({"image": "gray.png", "caption": "x"}) + '\n{"image": "pho')
    before = output.read_bytes()
    code, out, err = _batch(capsys, tiny, dataset, "-r", "--format", "jsonl", "-o", str(output), "--dry-run")
    assert code == 0
    assert "skip\tgray.png" in out.splitlines()
    assert "caption\tphoto.JPG" in out.splitlines()
    assert "dry run: 10 to caption, 1 already captioned, 0 refused" in err
    assert output.read_bytes() == before
    assert not (tmp_path / "c.errors.jsonl").exists()


def test_a_record_cut_by_a_kill_is_repaired(tmp_path):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"image": "a.png", "caption": "one"}\n{"image": "b.png", "capt')
    writer = JsonlWriter(jsonl)
    writer.load()
    assert writer.is_done("a.png") and not writer.is_done("b.png")
    assert jsonl.read_text() == '{"image": "a.png", "caption": "one"}\n'

    table = tmp_path / "c.csv"
    fields = ("image", "caption")
    table.write_text('image,caption\na.png,"two\nlines"\nb.png,"cut in\nthe mid')
    writer = CsvWriter(table, fields)
    writer.load()
    assert writer.is_done("a.png") and not writer.is_done("b.png")
    assert table.read_text() == 'image,caption\na.png,"two\nlines"\n'
    writer.write([{"image": "b.png", "caption": 'say "hi"'}])
    writer.close()
    with table.open(newline="") as file:
        assert list(csv.DictReader(file)) == [
            {"image": "a.png", "caption": "two\nlines"},
            {"image": "b.png", "caption": 'say "hi"'},
        ]


def test_batch_sizes_1_and_4_caption_the_same_images_alike(tiny, dataset, tmp_path, capsys):
    results = {}
    for size in (1, 4):
        output = tmp_path / f"bs{size}.jsonl"
        _batch(capsys, tiny, dataset, "-r", "--format", "jsonl", "-o", str(output), "--batch-size", str(size))
        results[size] = [(r["image"], r["caption"]) for r in _jsonl(output)]
    assert [name for name, _ in results[1]] == GOOD
    assert results[1] == results[4]


def test_out_of_memory_halves_the_batch_and_isolates_a_single_image(safe_llava, tmp_path, monkeypatch):
    for i in range(7):
        Image.fromarray(_noise(50 + i)).save(tmp_path / f"{i}.png")
    real = safe_llava.engine.generate
    sizes = []

    def tight_memory(inputs, options):
        size = inputs["input_ids"].shape[0]
        sizes.append(size)
        if size > 2 or (size == 1 and sizes.count(1) == 1):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(inputs, options)

    monkeypatch.setattr(safe_llava.engine, "generate", tight_memory)
    monkeypatch.setattr(safe_llava.engine, "_sizer", None)
    options = BatchOptions(root=tmp_path, format="jsonl", output=tmp_path / "out" / "c.jsonl", workers=0)
    writer = open_writer(options)
    captioner = BatchCaptioner(safe_llava, options, safe_llava.generation_options(batch_size=4), writer)
    progress = captioner.run(plan_folder(options, writer))
    assert sizes == [4, 2, 2, 2, 1]  # 4 fails, its halves pass, later batches are formed at 2
    assert captioner.sizer.size == 2
    assert (progress.captioned, progress.failed) == (6, 1)
    failure = _jsonl(tmp_path / "out" / "c.errors.jsonl")
    assert failure == [{"image": "6.png", "error": OOM_MESSAGE}]
    assert [r["image"] for r in _jsonl(tmp_path / "out" / "c.jsonl")] == [f"{i}.png" for i in range(6)]


def test_progress_lines_off_a_terminal(tiny, dataset, capsys):
    code, _, err = _batch(capsys, tiny, dataset, "-r", "--log-every", "4", "--batch-size", "2")
    assert code == 1
    lines = [line for line in err.splitlines() if "images/s," in line and "ETA" in line]
    assert [line.split(" images,")[0] for line in lines] == [
        "safellava: 4/11",
        "safellava: 8/11",
        "safellava: 11/11",
    ]


def test_bad_batch_usage(tiny, dataset, tmp_path, capsys):
    assert _batch(capsys, tiny, dataset, "--format", "csv")[0] == 2
    assert _batch(capsys, tiny, tmp_path / "nowhere")[0] == 2
    assert _batch(capsys, tiny, dataset, "--shard", "9/2")[0] == 2
    code, _, err = _batch(capsys, tiny, dataset, "--prompt-file", str(tmp_path / "none.txt"))
    assert code == 2 and "--prompt-file" in err


# Runs the CLI in a child process that SIGKILLs itself at a chosen moment of its Nth write: the kill
# lands at exactly the worst place every time, with no timing involved.
KILLED_RUN = """
import os, signal, sys
from safellava import writers
when, at = sys.argv[1], int(sys.argv[2])
writes = 0

def kill_during(real):
    def patched(*args, **kwargs):
        global writes
        writes += 1
        if writes == at:
            if when == "jsonl":  # half of the batch's bytes reach the disk, then the process dies
                self, records = args
                data = self._serialize(list(records), new_file=False).encode()
                with open(self.path, "ab") as file:
                    file.write(data[: len(data) // 2])
                    file.flush()
                    os.fsync(file.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return patched

if when == "jsonl":
    real = writers.JsonlWriter.write
    writers.JsonlWriter.write = lambda self, records: (
        kill_during(real)(self, records) if self.path.suffix == ".jsonl" and "errors" not in self.path.name
        else real(self, records)
    )
else:  # between a caption's temporary file and its rename
    writers.os.replace = kill_during(os.replace)
from safellava.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _killed_then_rerun(tiny, folder, flags, when, at, after_kill=lambda: None):
    command = [
        "batch",
        str(folder),
        *_model_flags(tiny),
        "--batch-size",
        "1",
        "--max-new-tokens",
        "4",
        *flags,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, when, str(at), *command], env=env, capture_output=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after_kill()
    rerun = subprocess.run(
        [sys.executable, "-m", "safellava", *command], env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    return rerun.stderr


def _folder_of(tmp_path, count):
    folder = tmp_path / "many"
    folder.mkdir()
    names = [f"img{i:03d}.png" for i in range(count)]
    for i, name in enumerate(names):
        Image.fromarray(_noise(100 + i)).save(folder / name)
    return folder, names


def test_kill_9_inside_a_jsonl_write_then_rerun_leaves_one_complete_record_per_image(tiny, tmp_path):
    folder, names = _folder_of(tmp_path, 8)
    output = tmp_path / "many.jsonl"

    def torn():
        assert not output.read_bytes().endswith(b"\n")

    err = _killed_then_rerun(tiny, folder, ["--format", "jsonl", "-o", str(output)], "jsonl", 4, torn)
    assert "captioned 5, skipped 3 already captioned" in err  # three whole records survived the kill
    lines = output.read_text().splitlines()
    assert sorted(json.loads(line)["image"] for line in lines) == names


def test_kill_9_inside_a_caption_file_write_leaves_no_temporary_file_after_the_rerun(tiny, tmp_path):
    folder, names = _folder_of(tmp_path, 5)
    out = tmp_path / "captions"

    def leftover():
        assert [p.name for p in out.glob(".img002.txt.*.tmp")], sorted(p.name for p in out.iterdir())

    _killed_then_rerun(tiny, folder, ["--output", str(out)], "sidecar", 3, leftover)
    assert sorted(p.name for p in out.iterdir()) == sorted(n.replace(".png", ".txt") for n in names)
    assert all((out / n.replace(".png", ".txt")).read_text().strip() for n in names)


def test_leftover_temporary_files_of_others_are_kept(tmp_path):
    (tmp_path / ".notes.md.abcd1234.tmp").write_text("not ours: another extension")
    (tmp_path / ".a.txt.abcd1234.tmp").write_text("ours")
    (tmp_path / ".a.txt.tmp").write_text("not a name mkstemp makes")
    writer = SidecarWriter(tmp_path, None)
    record = CaptionRecord("a.png", "a caption", "p", None, None)
    writer.write([record])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.txt.tmp", ".notes.md.abcd1234.tmp", "a.txt"]


def test_batch_refuses_a_foreign_csv_before_loading_and_keeps_it(tiny, tmp_path, images, capsys):
    other = tmp_path / "other.csv"
    other.write_text("name,score\nada,3\n")
    code = main(
        ["batch", str(images[0].parent), "--format", "csv", "-o", str(other), "--model", "/nonexistent"]
    )
    assert code == 2
    assert "its header is not image,caption" in capsys.readouterr().err
    assert other.read_text() == "name,score\nada,3\n"


def test_overwrite_keeps_the_old_output_until_new_records_exist(tiny, tmp_path, images, capsys):
    keep = tmp_path / "keep.jsonl"
    keep.write_text('{"image": "one.png", "caption": "old"}\n')
    folder = images[0].parent
    code = main(
        ["batch", str(folder), "--format", "jsonl", "-o", str(keep), "--overwrite", "--model", "/nonexistent"]
    )
    assert code == 2
    assert keep.read_text() == '{"image": "one.png", "caption": "old"}\n'
    code = main(
        ["batch", str(folder), "--format", "jsonl", "-o", str(keep), "--overwrite", *_model_flags(tiny)]
    )
    assert code == 0
    records = [json.loads(line) for line in keep.read_text().splitlines()]
    assert sorted(r["image"] for r in records) == sorted(p.name for p in images)
    assert all(r["caption"] != "old" for r in records)


def test_caption_files_and_transcripts_get_ordinary_permissions(tiny, tmp_path, images, safe_llava, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.open(images[0]).save(folder / "a.png")
    assert main(["batch", str(folder), *_model_flags(tiny), "--max-new-tokens", "4"]) == 0
    assert stat.S_IMODE((folder / "a.txt").stat().st_mode) == ordinary_mode()
    session = ChatSession(safe_llava, safe_llava.generation_options())
    saved = session.save(tmp_path / "talk.json")
    assert stat.S_IMODE(saved.stat().st_mode) == ordinary_mode()


@pytest.mark.parametrize("extension", [".png", "PNG", "", "a/b"])
def test_caption_extension_must_not_clobber_images(tiny, images, capsys, extension):
    code = main(
        ["batch", str(images[0].parent), *_model_flags(tiny), "--caption-ext", extension, "--overwrite"]
    )
    assert code == 2
    assert "--caption-ext" in capsys.readouterr().err
    assert Image.open(images[0]).size == (64, 48)


def test_captions_never_leave_the_output_folder_through_a_symlink(tiny, tmp_path, images, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.open(images[0]).save(outside / "b.png")
    root = tmp_path / "root"
    root.mkdir()
    Image.open(images[0]).save(root / "a.png")
    (root / "linked").symlink_to(outside)
    # Captions beside the images: the symlinked subfolder's image is refused, not written outside.
    code, _, err = _batch(capsys, tiny, root, "-r")
    assert code == 1 and "failed 1" in err
    assert (root / "a.txt").read_text().strip() and not (outside / "b.txt").exists()
    [failure] = _jsonl(root / "safellava-errors.jsonl")
    assert (
        failure["image"] == "linked/b.png"
        and "outside" in failure["error"]
        and "--output DIR" in failure["error"]
    )
    # Mirrored into an output folder, the same image is captioned inside it.
    assert _batch(capsys, tiny, root, "-r", "--output", str(tmp_path / "out"))[0] == 0
    assert (tmp_path / "out" / "linked" / "b.txt").read_text().strip()
    # A symlink inside the output folder that leads out of it (the repro).
    (tmp_path / "mimg" / "sub").mkdir(parents=True)
    Image.open(images[0]).save(tmp_path / "mimg" / "sub" / "x.png")
    (tmp_path / "mout").mkdir()
    (tmp_path / "mout" / "sub").symlink_to("../elsewhere2")
    code, _, _ = _batch(capsys, tiny, tmp_path / "mimg", "-r", "--output", str(tmp_path / "mout"))
    assert code == 1
    assert not (tmp_path / "elsewhere2").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_overwrite_never_replaces_a_file_that_is_not_ours(tiny, tmp_path, images, capsys, fmt):
    folder = tmp_path / "imgs"
    folder.mkdir()
    jpeg = folder / "a.jpg"
    Image.open(images[1]).save(jpeg)
    original = jpeg.read_bytes()
    foreign = {
        "system file": b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n",
        "foreign csv": b"name,score\nada,3\n",
        "one line": b"hello world not json\n",
        "no newline": b"\x89PNG\r",
    }
    for name, content in foreign.items():
        target = tmp_path / f"{name.replace(' ', '_')}.{fmt}"
        target.write_bytes(content)
        for overwrite in ([], ["--overwrite"]):
            code, _, err = _batch(capsys, tiny, folder, "--format", fmt, "-o", str(target), *overwrite)
            assert code == 2, (name, overwrite, err)
            assert "not a safellava output" in err and len(err.splitlines()) == 1
            assert target.read_bytes() == content, name
    code, _, err = _batch(capsys, tiny, folder, "--format", fmt, "-o", str(jpeg), "--overwrite")
    assert code == 2 and "named like an image" in err
    assert jpeg.read_bytes() == original


def test_the_errors_file_is_never_someone_elses_nor_the_output(tiny, tmp_path, images, capsys):
    folder = images[0].parent
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, _, err = _batch(capsys, tiny, folder, "--errors", str(notes))
    assert code == 2 and "not a safellava output" in err
    assert notes.read_text() == "my notes\n"
    same = tmp_path / "same.jsonl"
    same.write_text('{"image": "one.png", "caption": "kept"}\n')
    flags = ["--format", "jsonl", "-o", str(same), "--errors", str(same), "--overwrite"]
    code, _, err = _batch(capsys, tiny, folder, *flags)
    assert code == 2 and "is the --output file" in err
    assert same.read_text() == '{"image": "one.png", "caption": "kept"}\n'
    # An earlier errors file of ours is rewritten (failures are retried each run).
    ours = tmp_path / "errors.jsonl"
    ours.write_text('{"image": "gone.png", "error": "no such file"}\n')
    code, _, _ = _batch(capsys, tiny, folder, "--errors", str(ours), "--output", str(tmp_path / "txt"))
    assert code == 0 and not ours.exists()


def test_default_errors_files_of_two_formats_never_collide(tmp_path):
    paths = {
        BatchOptions(root=tmp_path, format=fmt, output=tmp_path / f"o1.{fmt}").errors_path
        for fmt in ("jsonl", "csv")
    }
    assert paths == {tmp_path / "o1.errors.jsonl", tmp_path / "o1.csv.errors.jsonl"}


def test_a_huge_prompt_file_is_refused_before_anything_loads(tmp_path, images, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"describe " * (10 * 2**20 // 9))
    code = main(["batch", str(images[0].parent), "--model", "/nonexistent", "--prompt-file", str(prompt)])
    assert code == 2
    assert "is over 1 MiB" in capsys.readouterr().err


def test_a_prompt_longer_than_the_context_is_refused_in_one_line(tiny, tmp_path, images, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("describe the street and the canal " * 3000)  # 100 KB, far over the tiny 1024 tokens
    code, _, err = _batch(
        capsys, tiny, images[0].parent, "--prompt-file", str(prompt), "-o", str(tmp_path / "o")
    )
    assert code == 2
    assert "and the model's context is 1024: shorten the prompt" in err
    assert len(err.splitlines()) == 1


def test_batches_are_cut_by_pixels_not_only_by_count(safe_llava, tmp_path, monkeypatch):
    for i, size in enumerate([(40, 30), (40, 30), (200, 150), (40, 30), (40, 30), (40, 30)]):
        Image.fromarray(_noise(60 + i, size)).save(tmp_path / f"{i}.png")
    sizes = []
    real = safe_llava.engine.caption

    def spy(images, options, prepared=None):
        sizes.append(len(images))
        return real(images, options, prepared)

    monkeypatch.setattr(safe_llava.engine, "caption", spy)
    options = BatchOptions(root=tmp_path, format="jsonl", output=tmp_path / "c.jsonl", max_batch_pixels=5000)
    writer = open_writer(options)
    BatchCaptioner(safe_llava, options, safe_llava.generation_options(batch_size=16), writer).run(
        plan_folder(options, writer)
    )
    # 1200 px each, the third 30000 px: it is a batch of its own, the others go four to a batch.
    assert sizes == [2, 1, 3]


@pytest.mark.parametrize("ext", [",,,", " , .", "."])
def test_an_extension_list_that_names_nothing_is_bad_usage(tiny, images, capsys, ext):
    code, _, err = _batch(capsys, tiny, images[0].parent, "--ext", ext)
    assert code == 2 and "--ext names no extension" in err


def test_a_newline_in_a_file_name_keeps_line_outputs_one_line_each(tiny, tmp_path, images, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.open(images[0]).save(folder / "two\nlines.png")
    code, out, _ = _batch(capsys, tiny, folder, "--dry-run")
    assert code == 0 and out == "caption\ttwo\\nlines.png\n"
    code = main(
        [
            "caption",
            str(folder / "two\nlines.png"),
            str(images[0]),
            *_model_flags(tiny),
            "--max-new-tokens",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and len(out.splitlines()) == 2 and out.startswith(f"{folder}/two\\nlines.png: ")


def test_an_empty_shard_or_folder_says_so(tiny, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _batch(capsys, tiny, tmp_path / "empty", "--shard", "2/3")
    assert code == 0
    assert "no images to caption: none with jpg,jpeg,png,webp,bmp,gif,tif,tiff in" in err
    assert "(subfolders need --recursive), in shard 2/3" in err
    assert "already captioned" not in err


def test_an_unexpected_decoder_error_fails_one_image_not_the_run(tiny, tmp_path, images, monkeypatch, capsys):

    real = batch_module.load_image

    def flaky(path, max_pixels):
        if path.name == "two.jpg":
            raise MemoryError("decoder ran out")
        return real(path, max_pixels)

    monkeypatch.setattr(batch_module, "load_image", flaky)
    output = tmp_path / "c.jsonl"
    code = main(["batch", str(images[0].parent), "--format", "jsonl", "-o", str(output), *_model_flags(tiny)])
    assert code == 1
    assert len(output.read_text().splitlines()) == 2
    errors = [json.loads(line) for line in (tmp_path / "c.errors.jsonl").read_text().splitlines()]
    assert errors == [{"image": "two.jpg", "error": "cannot be read (MemoryError: decoder ran out)"}]


def test_prompt_file_that_is_not_text(tiny, tmp_path, images, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\xff\xfe\x00bad")
    assert main(["batch", str(images[0].parent), *_model_flags(tiny), "--prompt-file", str(prompt)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_txt_output_that_is_a_file(tiny, tmp_path, images, capsys):
    target = tmp_path / "captions.txt"
    target.write_text("")
    assert main(["batch", str(images[0].parent), *_model_flags(tiny), "--output", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err
