"""Chat: the session's history and context trimming, the command loop, and the real CLI over a pipe."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from safellava.chat import ChatSession, ContextOverflowError
from safellava.cli import main
from safellava.prompts import LLAVA_V1_SYSTEM
from safellava.repl import HELP, TRIMMED_NOTICE, ChatIO, ChatLoop

from .conftest import MAX_NEW_TOKENS


def _session(loaded, image=None, **kwargs) -> ChatSession:
    session = ChatSession(loaded, loaded.generation_options(), **kwargs)
    if image is not None:
        session.set_image(str(image))
    return session


def _answer(session: ChatSession, question: str) -> str:
    answer = session.ask(question)
    for _ in answer:
        pass
    return answer.text


class Script:
    """A scripted user: lines to read, and everything the loop wrote, by channel."""

    def __init__(self, lines, interrupt_on_chunk=None):
        self.lines = list(lines)
        self.out: list[str] = []
        self.errors: list[str] = []
        self.notices: list[str] = []
        self.interrupt_on_chunk = interrupt_on_chunk
        self.chunks = 0

    def read_line(self, prompt):
        if not self.lines:
            return None
        line = self.lines.pop(0)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    def write(self, text):
        if text != "\n":
            self.chunks += 1
            if self.chunks == self.interrupt_on_chunk:
                raise KeyboardInterrupt
        self.out.append(text)

    def io(self, interactive=False):
        return ChatIO(self.read_line, self.write, self.errors.append, self.notices.append, interactive)


def test_history_is_kept_and_the_image_token_sent_once(safe_llava, images, monkeypatch):
    prompts = []
    original = safe_llava.engine.render

    def spy(turns):
        prompts.append(original(turns))
        return prompts[-1]

    monkeypatch.setattr(safe_llava.engine, "render", spy)
    session = _session(safe_llava, images[0])
    first = _answer(session, "Describe it")
    second = _answer(session, "What colour?")
    assert [t.role for t in session.turns] == ["user", "assistant", "user", "assistant"]
    assert [t.text for t in session.turns] == ["Describe it", first, "What colour?", second]
    assert session.turns[0].image and not session.turns[2].image
    assert (
        prompts[1]
        == f"{LLAVA_V1_SYSTEM} USER: <image>\nDescribe it ASSISTANT: {first}</s>USER: What colour? ASSISTANT:"
    )
    assert all(p.count("<image>") == 1 for p in prompts)


def test_first_answer_equals_caption_with_the_same_prompt(safe_llava, images):
    session = _session(safe_llava, images[0])
    assert _answer(session, "Describe it") == safe_llava.caption(str(images[0]), prompt="Describe it")


def test_text_only_conversation(safe_llava):
    session = _session(safe_llava)
    assert _answer(session, "Hello there")
    assert not session.turns[0].image


def test_oldest_turns_are_dropped_but_never_the_image_turn(safe_llava, images):
    session = _session(safe_llava, images[0], context_tokens=300)
    questions = [f"question number {i} about the street and the canal" for i in range(6)]
    for question in questions:
        _answer(session, question)
    assert session.dropped_turns >= 2
    assert session.turns[0].text == questions[0] and session.turns[0].image
    assert session.turns[-2].text == questions[-1]
    assert len(session.turns) < 2 * len(questions)


def test_question_too_long_even_alone(safe_llava, images):
    session = _session(safe_llava, images[0], context_tokens=40)
    with pytest.raises(ContextOverflowError, match="does not fit the model's context of 40 tokens"):
        session.ask("a long question " * 10)


def test_loop_tells_once_about_trimming(safe_llava, images):
    session = _session(safe_llava, images[0], context_tokens=300)
    script = Script([f"question number {i} about the street" for i in range(6)])
    assert ChatLoop(session, script.io()).run() == 0
    assert script.notices.count(TRIMMED_NOTICE) == 1


def test_save_round_trip_json_and_markdown(safe_llava, images, tmp_path):
    session = _session(safe_llava, images[0])
    answer = _answer(session, "Describe it")
    saved = json.loads(session.save(tmp_path / "talk.json").read_text())
    assert saved["model"] == safe_llava.model_id
    assert saved["vision_tower"] == safe_llava.vision_tower
    assert saved["image"] == str(images[0])
    assert saved["turns"] == [{"role": "user", "text": "Describe it"}, {"role": "assistant", "text": answer}]
    markdown = session.save(tmp_path / "talk.md").read_text()
    assert f"**User:** Describe it\n\n**Assistant:** {answer}\n" in markdown
    assert f"- vision tower: {safe_llava.vision_tower}" in markdown


def test_commands_and_bad_input_keep_the_session_going(safe_llava, images, tmp_path):
    session = _session(safe_llava, images[0])
    script = Script(
        [
            "Describe it",
            "/bogus",
            f"/image {tmp_path / 'missing.png'}",
            f"/save {tmp_path / 'no-such-folder' / 'talk.json'}",
            "/save",
            "/help",
            f'/image "{images[1]}"',
            "And this one?",
            "/reset",
            "/quit",
            "never read",
        ]
    )
    failures = ChatLoop(session, script.io()).run()
    assert failures == 4
    assert script.errors == [
        "unknown command /bogus: /help lists the commands",
        f"{tmp_path / 'missing.png'}: no such file",
        f"cannot save to {tmp_path / 'no-such-folder' / 'talk.json'}: folder "
        f"{tmp_path / 'no-such-folder'} does not exist",
        "/save needs a path, for example: /save photo.json",
    ]
    assert HELP in script.notices
    assert f"new conversation about {images[1]}" in script.notices
    assert session.image_name == str(images[1])
    assert session.turns == []  # /reset after the second image's exchange
    assert script.lines == ["never read"]
    assert "".join(script.out).count("\n") == 2


def test_ctrl_c_during_an_answer_stops_it_and_keeps_what_was_said(safe_llava, images):
    session = _session(safe_llava, images[0])
    session.options = safe_llava.generation_options(max_new_tokens=40)
    script = Script(["Describe it", "Next question"], interrupt_on_chunk=1)
    assert ChatLoop(session, script.io()).run() == 0
    assert "(answer stopped)" in script.notices
    assert [t.text for t in session.turns[::2]] == ["Describe it", "Next question"]
    full = _session(safe_llava, images[0])
    full.options = session.options
    assert len(session.turns[1].text) < len(_answer(full, "Describe it"))


def test_stop_ends_generation_early(safe_llava, images):
    session = _session(safe_llava, images[0])
    session.options = safe_llava.generation_options(max_new_tokens=60)
    answer = session.ask("Describe it")
    next(iter(answer))
    answer.stop()
    assert answer.stopped
    assert 0 < answer.num_tokens < 60
    assert session.turns[1].text == answer.text


def test_ctrl_c_or_end_of_input_at_the_prompt_leaves(safe_llava):
    script = Script([KeyboardInterrupt, "not read"])
    assert ChatLoop(_session(safe_llava), script.io(interactive=True)).run() == 0
    assert script.lines == ["not read"]
    assert ChatLoop(_session(safe_llava), Script([]).io()).run() == 0


def _cli(tiny):
    return ["--model", str(tiny.llava), "--vision-tower", str(tiny.safeclip), "--device", "cpu"]


def test_piped_chat_prints_just_the_answers(tiny, images, safe_llava, monkeypatch, capsys):
    expected_session = _session(safe_llava, images[0])
    expected = [_answer(expected_session, q) for q in ("Describe it", "What colour?")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe it\nWhat colour?\n/quit\n"))
    code = main(["chat", str(images[0]), *_cli(tiny), "--max-new-tokens", str(MAX_NEW_TOKENS)])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == f"{expected[0]}\n{expected[1]}\n"
    assert err == ""


def test_a_failed_command_fails_a_piped_script_but_not_a_terminal_session(tiny, images, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/imgae typo.png\n"))
    assert main(["chat", str(images[0]), *_cli(tiny)]) == 1
    assert "unknown command /imgae" in capsys.readouterr().err

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    lines = ["/imgae typo.png", "/quit"]
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt: lines.pop(0))
    assert main(["chat", str(images[0]), *_cli(tiny)]) == 0
    err = capsys.readouterr().err
    assert "unknown command /imgae" in err and "/help for commands" in err


def test_chat_with_an_unreadable_image_exits_1(tiny, tmp_path, capsys):
    code = main(["chat", str(tmp_path / "gone.png"), *_cli(tiny)])
    assert code == 1
    assert capsys.readouterr().err == f"safellava: error: {tmp_path / 'gone.png'}: no such file\n"


def test_caption_stream_prints_the_same_caption(tiny, images, safe_llava, capsys):
    code = main(["caption", str(images[0]), *_cli(tiny), "--stream", "--max-new-tokens", str(MAX_NEW_TOKENS)])
    assert code == 0
    assert capsys.readouterr().out == safe_llava.caption(str(images[0])) + "\n"


def test_caption_stream_takes_one_image(tiny, images, capsys):
    code = main(["caption", str(images[0]), str(images[1]), *_cli(tiny), "--stream"])
    assert code == 2
    assert "--stream takes one image" in capsys.readouterr().err


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


def test_save_never_replaces_what_is_not_a_transcript(safe_llava, images, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(images[0].read_bytes())
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    session = _session(safe_llava, image)
    _answer(session, "Describe it")
    script = Script(
        [
            f"/save {image}",
            f"/save {notes}",
            f"/save {tmp_path / 'talk.json'}",
            f"/save {tmp_path / 'talk.json'}",
        ]
    )
    assert ChatLoop(session, script.io()).run() == 2
    assert image.read_bytes() == images[0].read_bytes() and notes.read_text() == '{"mine": true}\n'
    assert all("exists and is not a safellava transcript (nothing was changed)" in e for e in script.errors)
    assert script.notices.count(f"saved {tmp_path / 'talk.json'}") == 2  # its own transcript is updated


def test_an_image_that_is_a_pipe_fails_at_once(safe_llava, tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    script = Script([f"/image {fifo}"])
    assert ChatLoop(_session(safe_llava), script.io()).run() == 1
    assert script.errors == [
        f"{fifo}: not a regular file (a pipe, device or socket): save the image to a file"
    ]


def test_an_answer_longer_than_the_context_is_capped_with_a_notice(tiny, images, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe it\n"))
    code = main(["chat", str(images[0]), *_cli(tiny), "--max-new-tokens", "1000000000"])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip()
    assert "max_new_tokens 1000000000 does not fit the model's context of 1024 tokens" in err
