"""Edge cases found in review: resume with odd bytes, overwrite safety, modes, limits, bad flags."""

from __future__ import annotations

import io
import json
import os
import stat
import sys

import pytest
import torch
from PIL import Image

import safellava
from safellava import model as model_module
from safellava.chat import ChatSession
from safellava.cli import main
from safellava.config import load_preset
from safellava.errors import ImageError, UsageError
from safellava.generate import stop_when_set
from safellava.images import load_image
from safellava.repl import ChatIO, ChatLoop
from safellava.writers import CsvWriter, JsonlWriter, ordinary_mode

from .conftest import MAX_NEW_TOKENS


def _flags(tiny, tower=None):
    return ["--model", str(tiny.llava), "--vision-tower", str(tower or tiny.safeclip), "--device", "cpu"]


# --- JSON Lines and CSV resume -------------------------------------------------------------------


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
    code = main(["batch", str(folder), "--format", "jsonl", "-o", str(keep), "--overwrite", *_flags(tiny)])
    assert code == 0
    records = [json.loads(line) for line in keep.read_text().splitlines()]
    assert sorted(r["image"] for r in records) == sorted(p.name for p in images)
    assert all(r["caption"] != "old" for r in records)


# --- files we create ------------------------------------------------------------------------------


def test_caption_files_and_transcripts_get_ordinary_permissions(tiny, tmp_path, images, safe_llava, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.open(images[0]).save(folder / "a.png")
    assert main(["batch", str(folder), *_flags(tiny), "--max-new-tokens", "4"]) == 0
    assert stat.S_IMODE((folder / "a.txt").stat().st_mode) == ordinary_mode()
    session = ChatSession(safe_llava, safe_llava.generation_options())
    saved = session.save(tmp_path / "talk.json")
    assert stat.S_IMODE(saved.stat().st_mode) == ordinary_mode()


@pytest.mark.parametrize("extension", [".png", "PNG", "", "a/b"])
def test_caption_extension_must_not_clobber_images(tiny, images, capsys, extension):
    code = main(["batch", str(images[0].parent), *_flags(tiny), "--caption-ext", extension, "--overwrite"])
    assert code == 2
    assert "--caption-ext" in capsys.readouterr().err
    assert Image.open(images[0]).size == (64, 48)


def test_images_under_a_symlinked_subfolder_are_captioned(tiny, tmp_path, images, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.open(images[0]).save(outside / "b.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(outside)
    assert main(["batch", str(root), "-r", *_flags(tiny), "--max-new-tokens", "4"]) == 0
    assert (outside / "b.txt").read_text().strip()


def test_export_never_replaces_a_folder_holding_its_sources_or_the_cwd(tiny, tmp_path, monkeypatch, capsys):
    assert main(["export", str(tiny.llava.parent), *_flags(tiny), "--force"]) == 2
    assert "which --force would delete" in capsys.readouterr().err
    assert (tiny.llava / "config.json").exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["export", ".", *_flags(tiny), "--force"]) == 2
    assert "the current folder" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep"


# --- the stock tower is never run unannounced ----------------------------------------------------


def test_a_preset_that_picks_the_original_tower_is_announced(tiny, tmp_path, images, capsys):
    preset = tmp_path / "stock.yaml"
    preset.write_text(f"model: {tiny.llava}\nvision_tower: original\ndevice: cpu\n")
    assert main(["caption", str(images[0]), "--preset", str(preset), "--max-new-tokens", "4"]) == 0
    assert "original CLIP vision tower, not Safe-CLIP" in capsys.readouterr().err
    assert main(["compare", str(images[0]), "--preset", str(preset)]) == 2
    assert "give a safe --vision-tower" in capsys.readouterr().err


# --- image limits ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_max_pixels_can_be_raised_above_pillows_own_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "big.png"
    Image.new("1", (60, 60)).save(path)  # 3600 pixels: over twice Pillow's limit
    with pytest.raises(ImageError, match="too large"):
        load_image(path, max_pixels=2000)
    assert load_image(path, max_pixels=5000).size == (60, 60)


def test_extreme_aspect_ratios_are_refused(tmp_path):
    path = tmp_path / "thin.png"
    Image.new("RGB", (2, 400)).save(path)
    with pytest.raises(ImageError, match=r"extreme aspect ratio \(2x400 px, over 50:1\)"):
        load_image(path)
    Image.new("RGB", (10, 400)).save(path)
    assert load_image(path).size == (10, 400)


def test_an_unexpected_decoder_error_fails_one_image_not_the_run(tiny, tmp_path, images, monkeypatch, capsys):
    from safellava import batch as batch_module

    real = batch_module.load_image

    def flaky(path, max_pixels):
        if path.name == "two.jpg":
            raise MemoryError("decoder ran out")
        return real(path, max_pixels)

    monkeypatch.setattr(batch_module, "load_image", flaky)
    output = tmp_path / "c.jsonl"
    code = main(["batch", str(images[0].parent), "--format", "jsonl", "-o", str(output), *_flags(tiny)])
    assert code == 1
    assert len(output.read_text().splitlines()) == 2
    errors = [json.loads(line) for line in (tmp_path / "c.errors.jsonl").read_text().splitlines()]
    assert errors == [{"image": "two.jpg", "error": "cannot be read (MemoryError: decoder ran out)"}]


# --- flags and presets that are wrong -------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["caption", "x.png", "--seed", "-1"],
        ["caption", "x.png", "--seed", str(2**32)],
    ],
)
def test_out_of_range_seed_is_a_flag_error(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "must be between 0 and 2**32 - 1" in capsys.readouterr().err


def test_stdin_twice_is_bad_usage(tiny, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert main(["caption", "-", "-", *_flags(tiny)]) == 2
    assert "can be given only once" in capsys.readouterr().err


def test_prompt_file_that_is_not_text(tiny, tmp_path, images, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\xff\xfe\x00bad")
    assert main(["batch", str(images[0].parent), *_flags(tiny), "--prompt-file", str(prompt)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_txt_output_that_is_a_file(tiny, tmp_path, images, capsys):
    target = tmp_path / "captions.txt"
    target.write_text("")
    assert main(["batch", str(images[0].parent), *_flags(tiny), "--output", str(target)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_generation_flags_are_checked_before_the_model_loads(images, capsys):
    code = main(["caption", str(images[0]), "--model", "/nonexistent", "--top-p", "0"])
    assert code == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [1]\n", "model must be text, got \\[1\\]"),
        ("device: 5\n", "device must be text, got 5"),
        ("generation:\n  max_new_tokens: many\n", "max_new_tokens must be a whole number"),
        ("generation:\n  temperature: true\n", "temperature must be a number"),
        ("revision: null\ngeneration:\n  seed: 3\n  temperature: 1\n", None),
    ],
)
def test_preset_values_of_the_wrong_type(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    if message is None:
        preset = load_preset(str(path))
        assert (preset.generation.seed, preset.generation.temperature) == (3, 1)
        return
    with pytest.raises(UsageError, match=message):
        load_preset(str(path))


def test_unknown_library_options_are_usage_errors(safe_llava, images):
    with pytest.raises(UsageError, match="unknown option bogus"):
        safe_llava.caption(str(images[0]), bogus=1)


def test_library_batch_size_can_go_back_up(safe_llava, images, monkeypatch):
    sizes = []
    real = model_module.caption_batch

    def spy(model, processor, chunk, options, prompt_format):
        sizes.append(len(chunk))
        return real(model, processor, chunk, options, prompt_format)

    monkeypatch.setattr(model_module, "caption_batch", spy)
    paths = [str(p) for p in images]
    safe_llava.caption(paths, batch_size=1)
    safe_llava.caption(paths, batch_size=3)
    assert sizes == [1, 1, 1, 3]


# --- streaming and chat ---------------------------------------------------------------------------


def test_the_stop_criterion_answers_on_the_inputs_device():
    import threading

    from transformers import StoppingCriteriaList

    event = threading.Event()
    ids = torch.zeros((2, 3), dtype=torch.long, device="meta")
    done = StoppingCriteriaList([stop_when_set(event)])(ids, None)  # ORs with a tensor on ids' device
    assert done.device.type == "meta"
    event.set()
    assert stop_when_set(event)(torch.zeros((2, 3), dtype=torch.long), None).tolist() == [True, True]


def test_an_unclosed_quote_in_a_chat_command_keeps_the_chat_going(safe_llava, images):
    lines = ['/image "unclosed', "hello"]
    out, errors = [], []
    io_ = ChatIO(
        lambda prompt: lines.pop(0) if lines else None, out.append, errors.append, lambda m: None, False
    )
    session = ChatSession(safe_llava, safe_llava.generation_options(max_new_tokens=MAX_NEW_TOKENS))
    assert ChatLoop(session, io_).run() == 1
    assert errors == ['"unclosed: no such file']
    assert "".join(out).endswith("\n") and len(session.turns) == 2


def test_exports_get_ordinary_permissions(tiny, tmp_path):
    target = safellava.load(model=str(tiny.llava), vision_tower=str(tiny.safeclip), device="cpu")
    from safellava.export import export

    out = export(target, tmp_path / "merged")
    assert stat.S_IMODE(out.stat().st_mode) == ordinary_mode(directory=True)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {ordinary_mode()}
    assert os.access(out / "model.safetensors", os.R_OK)
