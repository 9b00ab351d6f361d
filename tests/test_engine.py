"""The engine: generation settings, seeds, the batch that halves on out-of-memory, streaming stops."""

from __future__ import annotations

import pytest
import torch

from safellava.config import GenerationOptions
from safellava.errors import OutOfMemoryError
from safellava.generate import OOM_MESSAGE, BatchSizer, generation_kwargs, stop_when_set


class _Tokenizer:
    pad_token_id = None
    eos_token_id = 2


def test_greedy_and_sampling_generation_kwargs():
    greedy = generation_kwargs(GenerationOptions(max_new_tokens=5), _Tokenizer())
    assert greedy["do_sample"] is False
    assert greedy["max_new_tokens"] == 5
    assert greedy["pad_token_id"] == 2
    sampled = generation_kwargs(GenerationOptions(temperature=0.7, top_p=0.9), _Tokenizer())
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"]) == (True, 0.7, 0.9)


def test_sampling_with_a_seed_is_reproducible(safe_llava, images):
    kwargs = {"temperature": 1.5, "seed": 7, "max_new_tokens": 8}
    first = safe_llava.caption(str(images[0]), **kwargs)
    assert safe_llava.caption(str(images[0]), **kwargs) == first
    others = {safe_llava.caption(str(images[0]), **{**kwargs, "seed": s}) for s in range(8, 12)}
    assert others - {first}, "different seeds never changed the sampled caption"


def test_batch_halves_on_out_of_memory_and_stays_reduced():
    calls: list[int] = []

    def step(chunk):
        calls.append(len(chunk))
        if len(chunk) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [item * 10 for item in chunk]

    sizer = BatchSizer(8)
    assert sizer.run(list(range(7)), step) == [i * 10 for i in range(7)]
    assert calls == [7, 4, 2, 2, 2, 1]
    assert sizer.size == 2
    calls.clear()
    assert sizer.run([1, 2, 3], step) == [10, 20, 30]
    assert calls == [2, 1]


def test_out_of_memory_on_a_single_image_is_one_message_in_every_path(safe_llava, images, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert BatchSizer(2).run([1, 2], no_memory) == [None, None]
    monkeypatch.setattr(safe_llava.engine, "_sizer", None)  # the shrunken size must not outlive the test
    monkeypatch.setattr(safe_llava.model, "generate", no_memory)
    paths = [str(p) for p in images[:2]]
    with pytest.raises(OutOfMemoryError) as batched:
        safe_llava.caption(paths, batch_size=2)
    answer = safe_llava.stream(paths[0])
    with pytest.raises(OutOfMemoryError) as streamed:
        list(answer)
    assert str(batched.value) == str(streamed.value) == OOM_MESSAGE


def test_library_batch_size_can_go_back_up(safe_llava, images, monkeypatch):
    sizes = []
    real = safe_llava.engine.generate

    def spy(inputs, options):
        sizes.append(inputs["input_ids"].shape[0])
        return real(inputs, options)

    monkeypatch.setattr(safe_llava.engine, "generate", spy)
    paths = [str(p) for p in images]
    safe_llava.caption(paths, batch_size=1)
    safe_llava.caption(paths, batch_size=3)
    assert sizes == [1, 1, 1, 3]


def test_the_stop_criterion_answers_on_the_inputs_device():
    import threading

    from transformers import StoppingCriteriaList

    event = threading.Event()
    ids = torch.zeros((2, 3), dtype=torch.long, device="meta")
    done = StoppingCriteriaList([stop_when_set(event)])(ids, None)  # ORs with a tensor on ids' device
    assert done.device.type == "meta"
    event.set()
    assert stop_when_set(event)(torch.zeros((2, 3), dtype=torch.long), None).tolist() == [True, True]


def test_a_thread_gets_its_own_tokenizer_even_when_the_owners_id_comes_back(safe_llava):
    import threading

    from safellava.generate import Engine

    made = []
    owner = threading.Thread(
        target=lambda: made.append(Engine(safe_llava.model, safe_llava.processor, "llava_v1"))
    )
    owner.start()
    owner.join()
    engine = made[0]
    seen = []
    later = threading.Thread(
        target=lambda: seen.append(engine._thread_processor())
    )  # may reuse the owner's id
    later.start()
    later.join()
    assert seen[0] is not engine.processor
