"""Terminal output: the progress bars' status line before the first step, and the chat loop."""

import io

from rich.console import Console

from tinyml_cli import UserError, ui


def rendered(title, calls) -> str:
    con = Console(file=io.StringIO(), width=150, force_terminal=False, color_system=None)
    with ui.training_bar(con, title) as bar:
        calls(bar)
    return con.file.getvalue()


def test_training_bar_says_the_phase_before_the_first_step_and_never_none():
    text = rendered("sft", lambda bar: bar.status("encoding runs/shapes/train.jsonl"))
    assert "sft" in text and "encoding runs/shapes/train.jsonl" in text
    assert "None" not in text and "ETA" not in text and "loss" not in text  # nothing to count yet

    def steps(bar):
        bar.status("loading the model")
        bar(3, 10, 1.23456, 1500.0)
    text = rendered("sft", steps)
    assert "3/10" in text and "loss 1.2346" in text and "1,500 tok/s" in text and "ETA" in text
    assert "loading the model" not in text and "None" not in text


def test_count_bar_has_a_status_too():
    con = Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)
    with ui.count_bar(con, "eval") as bar:
        bar.status("loading runs/sft")
    assert "loading runs/sft" in con.file.getvalue() and "None" not in con.file.getvalue()


class FakeSession:
    """A chat session whose bot echoes: what ui.chat does with lines, commands and errors."""

    def __init__(self):
        from types import SimpleNamespace
        self.bot, self.pending, self.asked, self.commands = SimpleNamespace(folder="m", kind="torch"), [], [], []

    def command(self, line):
        self.commands.append(line)
        if line == "/exit":
            return None
        if line == "/bad":
            raise UserError("unknown command /bad")
        return "ok"

    def ask(self, text, on_text=None):
        self.asked.append(text)
        for piece in ("re: ", text):
            on_text(piece)


def test_chat_loop_streams_answers_to_stdout_and_notes_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n/reset\n/bad\nsecond\n/exit\nnever\n"))
    session = FakeSession()
    ui.chat(session, ui.console(True))
    out, err = capsys.readouterr()
    assert out == "re: hello\nre: second\n"
    assert session.asked == ["hello", "second"] and session.commands == ["/reset", "/bad", "/exit"]
    assert "error: unknown command /bad" in err and "ok" in err
