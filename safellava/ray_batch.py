"""``batch --ray``: a folder captioned on a Ray cluster (extra ``ray``: Ray Data).

The driver plans as a plain batch does (discovery, shard, resume). Ray Data reads and decodes the
images on the cluster; a pool of actors, each holding one loaded model (either backend), captions
them in batches; the driver writes records and failures through the same writers as the plain
batch, in completion order, so resume, the errors file and the record schema are the same. A file
that cannot be read is a failure record, not a failed job; an actor that dies is restarted by Ray
and its batch retried.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from .batch import BatchOptions, BatchPlan, Progress, RunLog
from .config import GenerationOptions
from .errors import ImageError, UsageError
from .records import CaptionRecord, GenerationSettings, Provenance
from .writers import Writer

INSTALL_HINT = "--ray needs Ray Data: pip install 'safellava[ray]'"


@dataclass(frozen=True)
class RayOptions:
    """Where the work runs and how it is spread."""

    address: str | None = None  # a cluster (ray://..., auto); None: $RAY_ADDRESS, else a local Ray
    num_workers: int = 1  # actors, each holding one loaded model
    gpus_per_worker: float = 0.0  # GPUs each actor reserves (0 on a CPU cluster)
    cpus_per_worker: float = 1.0  # CPUs each actor reserves


def require_ray() -> None:
    """A ``UsageError`` saying how to install Ray, where Ray Data cannot be imported."""
    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(INSTALL_HINT) from None


def decode(row: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    """Read and decode one image (on the cluster): the RGB pixels, or why it cannot be used."""
    import numpy as np

    from .images import load_image

    try:
        pixels, error = np.asarray(load_image(row["path"], max_pixels)), ""
    except ImageError as exc:
        pixels, error = np.zeros((1, 1, 3), dtype=np.uint8), exc.reason
    except Exception as exc:  # a decoder's own failure is one image's, as in the plain batch
        pixels, error = np.zeros((1, 1, 3), dtype=np.uint8), f"cannot be read ({type(exc).__name__}: {exc})"
    return {"name": row["name"], "pixels": pixels, "error": error}


class Captioner:
    """A Ray actor holding one loaded model; captions the decoded images of a batch."""

    def __init__(self, load_options: dict[str, Any], generation: dict[str, Any], backend: str):
        from . import logs

        logs.configure(verbose=False)
        if backend == "vllm":
            from .vllm_backend import load_vllm

            self.loaded = load_vllm(**load_options)
        else:
            from .loader import load

            self.loaded = load(**load_options)
        self.options = GenerationOptions(**generation)
        self.provenance = json.dumps(asdict(self.loaded.provenance))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        from .generate import OOM_MESSAGE

        names, errors = list(batch["name"]), list(batch["error"])
        good = [i for i, error in enumerate(errors) if not error]
        captions = [""] * len(names)
        if good:
            images = [Image.fromarray(batch["pixels"][i]) for i in good]
            for index, caption in zip(good, self.loaded.engine.caption(images, self.options), strict=True):
                if caption is None:
                    errors[index] = OOM_MESSAGE
                else:
                    captions[index] = caption
        return {
            "name": names,
            "caption": captions,
            "error": errors,
            "provenance": [self.provenance] * len(names),
        }


def connect(options: RayOptions, verbose: bool = False) -> None:
    """Join the cluster named (or by ``$RAY_ADDRESS``), else start a local Ray for this run."""
    import logging

    import ray

    if not ray.is_initialized():
        address = options.address or os.environ.get("RAY_ADDRESS")
        # The workers inherit what matters for loading, such as HF_HUB_OFFLINE and the hub cache.
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.ERROR,
        )
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False


def run_on_ray(
    plan: BatchPlan,
    options: BatchOptions,
    generation: GenerationOptions,
    load_options: dict[str, Any],
    writer: Writer,
    ray_options: RayOptions,
    backend: str = "transformers",
    on_progress: Any = None,
    verbose: bool = False,
) -> Progress:
    """Caption ``plan.todo`` on Ray, writing records and failures as batches complete."""
    require_ray()
    import ray.data

    connect(ray_options, verbose)
    settings = GenerationSettings.of(generation)
    with RunLog(options, writer, plan, on_progress) as log:
        if not plan.todo:
            return log.progress
        rows = [{"path": str(item.path), "name": item.name} for item in plan.todo]
        dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), 64))
        # Decoding runs in tasks of its own (half a CPU each, so it is not fused into the actors): the
        # next images are decoded while the actors caption.
        dataset = dataset.map(decode, fn_kwargs={"max_pixels": options.max_pixels}, num_cpus=0.5)
        dataset = dataset.map_batches(
            Captioner,
            fn_constructor_kwargs={
                "load_options": load_options,
                "generation": asdict(generation),
                "backend": backend,
            },
            batch_size=generation.batch_size,
            compute=ray.data.ActorPoolStrategy(size=ray_options.num_workers),
            num_gpus=ray_options.gpus_per_worker,
            num_cpus=ray_options.cpus_per_worker,
            # Ray Data's defaults for actor pools: a lost actor is restarted and its batch retried.
        )
        provenance: Provenance | None = None
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            records, failures = [], []
            for name, caption, error, origin in zip(
                batch["name"], batch["caption"], batch["error"], batch["provenance"], strict=True
            ):
                if error:
                    failures.append((str(name), str(error)))
                    continue
                provenance = provenance or Provenance(**json.loads(str(origin)))
                text = options.decorate(str(caption))
                records.append(CaptionRecord(str(name), text, generation.prompt, provenance, settings))
            log.add(records, failures)
    return log.progress
