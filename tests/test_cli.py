"""``safellava caption`` end to end on both tiny models: output, exit codes, one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from safellava.cli import main

from .conftest import MAX_NEW_TOKENS


def _models(tiny, family="llava", tower=None):
    return [
        "--model",
        str(getattr(tiny, family)),
        "--vision-tower",
        str(tower or tiny.safeclip),
        "--device",
        "cpu",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
    ]


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_one_image_prints_just_the_caption(tiny, images, capsys, family, request):
    code, out, err = _run(capsys, ["caption", str(images[0]), *_models(tiny, family)])
    loaded = request.getfixturevalue("safe_llava" if family == "llava" else "safe_next")
    assert code == 0
    assert err == ""
    assert out == loaded.caption(str(images[0])) + "\n"


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_several_images_are_prefixed_with_their_names(tiny, images, capsys, family):
    paths = [str(p) for p in images]
    code, out, _ = _run(capsys, ["caption", *paths, *_models(tiny, family), "--batch-size", "2"])
    assert code == 0
    lines = out.splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == paths
    assert all(line.split(": ", 1)[1] for line in lines)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_json_records_name_model_tower_and_prompt(tiny, images, capsys, family):
    paths = [str(p) for p in images[:2]]
    code, out, _ = _run(
        capsys, ["caption", *paths, *_models(tiny, family), "--json", "--prompt", "What is here?"]
    )
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in records] == paths
    for record in records:
        assert record["caption"]
        assert record["model"] == str(getattr(tiny, family))
        assert record["vision_tower"] == str(tiny.safeclip)
        assert record["prompt"] == "What is here?"
        assert record["generation"]["max_new_tokens"] == MAX_NEW_TOKENS
        assert record["generation"]["temperature"] == 0.0


def test_a_bad_file_among_good_ones(tiny, images, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    missing = tmp_path / "gone.png"
    argv = ["caption", str(images[0]), str(bad), str(missing), str(images[1]), *_models(tiny), "--json"]
    code, out, err = _run(capsys, argv)
    assert code == 1
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(images[0]), str(images[1])]
    assert err.splitlines() == [
        f"safellava: skipped {bad}: not an image file (unrecognised format)",
        f"safellava: skipped {missing}: no such file",
    ]


def test_no_readable_image_stops_before_loading(tmp_path, capsys):
    code, out, err = _run(capsys, ["caption", str(tmp_path / "a.png"), "--model", str(tmp_path / "none")])
    assert code == 1
    assert out == ""
    assert err.splitlines()[-1] == "safellava: no image could be read"


def test_image_from_stdin(tiny, images, capsys, monkeypatch, safe_llava):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(images[0].read_bytes())))
    code, out, _ = _run(capsys, ["caption", "-", *_models(tiny)])
    assert code == 0
    assert out == safe_llava.caption(str(images[0])) + "\n"


def test_original_tower_is_announced_and_differs(tiny, images, capsys):
    safe_code, safe_out, _ = _run(capsys, ["caption", str(images[0]), *_models(tiny)])
    code, out, err = _run(capsys, ["caption", str(images[0]), *_models(tiny, tower="original")])
    assert (safe_code, code) == (0, 0)
    assert "original CLIP vision tower, not Safe-CLIP" in err
    assert out != safe_out


@pytest.mark.parametrize(
    ("tower", "mismatch"),
    [
        ("clip_wide", "hidden size 48 where the LLaVA needs 32"),
        ("clip_large_images", "image size 96 where the LLaVA needs 64"),
        ("clip_coarse_patches", "patch size 16 where the LLaVA needs 8"),
    ],
)
def test_incompatible_tower_exits_2_with_one_line(tiny, images, capsys, tower, mismatch):
    code, out, err = _run(capsys, ["caption", str(images[0]), *_models(tiny, tower=getattr(tiny, tower))])
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("safellava: error: vision tower ")
    assert mismatch in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "{safeclip}"], "not LLaVA 1.5 or 1.6"),
        (["--model", "{missing}"], "model folder {missing} does not exist"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--preset", "llava-9"], "unknown preset 'llava-9'"),
    ],
)
def test_bad_model_or_option_exits_2_with_one_line(tiny, images, tmp_path, capsys, flags, message):
    paths = {"safeclip": tiny.safeclip, "missing": tmp_path / "missing"}
    base = ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]
    argv = ["caption", str(images[0]), *base, *[f.format(**paths) for f in flags]]
    code, out, err = _run(capsys, argv)
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert message.format(**paths) in err


@pytest.mark.parametrize(
    "flags", [["--quantize", "3bit"], ["--max-new-tokens", "0"], ["--temperature", "-1"], ["--bogus"]]
)
def test_bad_flags_exit_2(images, capsys, flags):
    with pytest.raises(SystemExit) as caught:
        main(["caption", str(images[0]), *flags])
    assert caught.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_verbose_shows_the_traceback(tiny, images):
    from safellava.errors import IncompatibleTowerError

    with pytest.raises(IncompatibleTowerError):
        main(["caption", str(images[0]), *_models(tiny, tower=tiny.clip_wide), "--verbose"])
    with pytest.raises(IncompatibleTowerError):
        main(["--verbose", "caption", str(images[0]), *_models(tiny, tower=tiny.clip_wide)])


def test_installed_command_is_quiet(tiny, images, safe_llava):
    """The real process prints the caption and nothing else: no transformers logs or bars."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "safellava", "caption", str(images[0]), *_models(tiny), "--quantize", "4bit"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert len(result.stdout.splitlines()) == 1
    assert result.stdout.strip()


def test_a_preset_that_picks_the_original_tower_is_announced(tiny, tmp_path, images, capsys):
    preset = tmp_path / "stock.yaml"
    preset.write_text(f"model: {tiny.llava}\nvision_tower: original\ndevice: cpu\n")
    assert main(["caption", str(images[0]), "--preset", str(preset), "--max-new-tokens", "4"]) == 0
    assert "original CLIP vision tower, not Safe-CLIP" in capsys.readouterr().err
    assert main(["compare", str(images[0]), "--preset", str(preset)]) == 2
    assert "give a safe --vision-tower" in capsys.readouterr().err


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
    assert main(["caption", "-", "-", *_models(tiny)]) == 2
    assert "can be given only once" in capsys.readouterr().err


def test_generation_settings_are_checked_before_the_model_loads(images, tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: /nonexistent\ngeneration:\n  top_p: 0\n")
    code = main(["caption", str(images[0]), "--preset", str(preset)])
    assert code == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["caption", str(images[0]), "--model", "/nonexistent", "--top-p", "0"])
    assert caught.value.code == 2
    assert "argument --top-p: must be above 0 and at most 1, got 0" in capsys.readouterr().err


def test_pipes_and_devices_are_skipped_and_the_rest_captioned(tiny, images, tmp_path, capsys):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    code, out, err = _run(
        capsys, ["caption", str(fifo), "/dev/zero", "/dev/urandom", str(images[0]), *_models(tiny)]
    )
    assert code == 1
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(images[0])]
    assert err.splitlines() == [
        f"safellava: skipped {path}: not a regular file (a pipe, device or socket): save the image to a file"
        for path in (fifo, "/dev/zero", "/dev/urandom")
    ]


def test_max_new_tokens_beyond_the_context_is_capped_with_one_notice(tiny, images, capsys):
    code, out, err = _run(
        capsys, ["caption", str(images[0]), *_models(tiny), "--max-new-tokens", "1000000000"]
    )
    assert code == 0 and out.strip()
    assert err.startswith(
        "safellava: max_new_tokens 1000000000 does not fit the model's context of 1024 tokens after a "
    )
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("flag", ["--temperature", "--top-p"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_not_a_number_is_a_flag_error(images, capsys, flag, value):
    with pytest.raises(SystemExit) as caught:
        main(["caption", str(images[0]), flag, value, "--model", "/nonexistent"])
    assert caught.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_a_hub_that_cannot_be_reached_says_what_to_do(images, capsys):
    code, _, err = _run(capsys, ["caption", str(images[0]), "--model", "no-such-org/no-such-llava"])
    assert code == 2 and len(err.splitlines()) == 1
    assert "the Hugging Face hub cannot be reached and no-such-org/no-such-llava is not in its cache" in err
    assert "HF_HUB_OFFLINE=1" in err and "scripts/make_tiny_checkpoints.py" in err
