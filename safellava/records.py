"""The caption record: one image's caption with everything that produced it, in one schema for every output."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .config import GenerationOptions


@dataclass(frozen=True)
class Provenance:
    """What produced an output: the checkpoints, their revisions, quantization and the tower's exact weights."""

    model: str  # LLaVA checkpoint: hub id or folder
    vision_tower: str  # tower checkpoint, or "original" for the LLaVA's own CLIP
    revision: str | None  # of the LLaVA hub repo, as asked for
    tower_revision: str | None  # of the tower hub repo, as asked for
    quantize: str  # none | 4bit | 8bit
    preset: str | None  # the preset the setup came from, if any
    tower_fingerprint: str | None  # sha256 of the tower's weights as stored (see vision.fingerprint)
    prompt_format: str  # how the conversation became prompt text


@dataclass(frozen=True)
class GenerationSettings:
    """The generation options a record keeps (the prompt is a field of the record itself)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    system: str | None

    @classmethod
    def of(cls, options: GenerationOptions) -> GenerationSettings:
        """The settings of a set of generation options."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class CaptionRecord:
    """One image's caption, its prompt, and what produced it."""

    image: str  # as the user named it (caption, compare) or relative to the input folder (batch)
    caption: str
    prompt: str
    provenance: Provenance
    generation: GenerationSettings

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: flat provenance fields, generation settings nested under ``generation``."""
        return {
            "image": self.image,
            "caption": self.caption,
            "prompt": self.prompt,
            **asdict(self.provenance),
            "generation": asdict(self.generation),
        }

    def to_row(self) -> dict[str, Any]:
        """The flat form, for tables: every field a column (see ``CSV_FIELDS``)."""
        row = self.to_dict()
        generation = row.pop("generation")
        return {**row, **generation}


CSV_FIELDS = (
    "image",
    "caption",
    "prompt",
    *(f.name for f in fields(Provenance)),
    *(f.name for f in fields(GenerationSettings)),
)
