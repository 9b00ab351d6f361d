"""One record schema for every output: caption --json, batch jsonl and csv, compare --json."""

from __future__ import annotations

import csv
import json

import pytest

from safellava.cli import main
from safellava.records import CSV_FIELDS, CaptionRecord, GenerationSettings, Provenance

from .conftest import MAX_NEW_TOKENS

GENERATION = {"max_new_tokens", "temperature", "top_p", "seed", "system"}


def _flags(tiny):
    return ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu",
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--seed", "5", "--temperature", "0.7"]  # fmt: skip


@pytest.fixture
def outputs(tiny, images, tmp_path, capsys):
    """Every command's machine-readable record of the same image, and info's fingerprint."""
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / images[0].name).write_bytes(images[0].read_bytes())
    assert main(["caption", str(images[0]), *_flags(tiny), "--json"]) == 0
    caption = json.loads(capsys.readouterr().out)
    assert main(["compare", str(images[0]), *_flags(tiny), "--json"]) == 0
    compare = json.loads(capsys.readouterr().out)
    assert (
        main(["batch", str(folder), *_flags(tiny), "--format", "jsonl", "-o", str(tmp_path / "c.jsonl")]) == 0
    )
    batch = json.loads((tmp_path / "c.jsonl").read_text())
    assert main(["batch", str(folder), *_flags(tiny), "--format", "csv", "-o", str(tmp_path / "c.csv")]) == 0
    with (tmp_path / "c.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert main(["info", "--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--json"]) == 0
    fingerprint = json.loads(capsys.readouterr().out)["vision_tower"]["fingerprint"]
    return caption, compare, batch, rows, fingerprint


def test_every_output_shares_the_record_schema(outputs, tiny):
    caption, compare, batch, rows, fingerprint = outputs
    assert set(caption) == set(batch)
    assert set(compare) == set(caption) | {"safe", "original", "original_tower", "seed"}
    assert list(rows[0]) == list(CSV_FIELDS)
    for record in (caption, compare, batch):
        assert record["generation"] == {
            "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.7, "top_p": 1.0, "seed": 5, "system": None
        }  # fmt: skip
        assert record["tower_fingerprint"] == fingerprint
        assert record["model"] == str(tiny.llava) and record["vision_tower"] == str(tiny.safeclip)
        assert record["prompt_format"] == "llava_v1"
    assert rows[0]["tower_fingerprint"] == fingerprint
    assert (rows[0]["seed"], rows[0]["temperature"], rows[0]["system"]) == ("5", "0.7", "")
    # The same image, prompt and seed: the same caption everywhere.
    assert (
        caption["caption"] == compare["safe"] == compare["caption"] == batch["caption"] == rows[0]["caption"]
    )


def test_record_forms():
    provenance = Provenance("m", "t", None, "v2", "4bit", "p", "sha256:x", "llava")
    record = CaptionRecord("a.png", "cap", "q", provenance, GenerationSettings(9, 0.0, 1.0, None, "sys"))
    as_dict = record.to_dict()
    assert list(as_dict)[:3] == ["image", "caption", "prompt"]
    assert as_dict["generation"] == {
        "max_new_tokens": 9,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": None,
        "system": "sys",
    }
    assert as_dict["tower_revision"] == "v2" and as_dict["quantize"] == "4bit"
    assert list(record.to_row()) == list(CSV_FIELDS)
