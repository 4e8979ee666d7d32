"""The CLI's contract for bad options (issue 18, defect 4): one `error:` line, exit 1 — also for
the values click itself rejects (which used to print click's usage block and exit 2)."""
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgeq.cli import main

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


def one_error_line(text):
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    assert "Usage:" not in text and "Traceback" not in text, text
    return lines[0]


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "q8"
    code, text = run_cli("build", tiny_llama, "--bits", "8", "-o", out)
    assert code == 0, text
    return out


@pytest.mark.parametrize("value", ["-5", "0"])
def test_run_refuses_a_max_tokens_below_one(built, value):
    code, text = run_cli("run", built, "--prompt", "hello", "--max-tokens", value, "--raw")
    assert code == 1, text
    assert "--max-tokens must be >= 1" in one_error_line(text)


@pytest.mark.parametrize("command", [["run", "--prompt", "hello"], ["profile", "--runs", "1", "--max-tokens", "2"],
                                     ["eval", "--tasks", "wikitext", "--ppl-tokens", "64"]])
@pytest.mark.parametrize("threads", ["0", "-2"])
def test_commands_refuse_a_thread_count_below_one(built, command, threads):
    code, text = run_cli(command[0], built, *command[1:], "--threads", threads)
    assert code == 1 and "--threads must be >= 1" in one_error_line(text)


@pytest.mark.parametrize("args, needle", [
    (["--format", "tflite"], "'tflite' is not one of"),
    (["--bits", "3.5"], "'3.5' is not a valid integer"),
    (["--sort", "random"], "'random' is not one of"),
    (["--no-such-option"], "No such option"),
])
def test_options_click_rejects_are_one_error_line_and_exit_1(tiny_llama, tmp_path, args, needle):
    out = tmp_path / "out"
    code, text = run_cli("build", tiny_llama, "-o", out, *args)
    assert code == 1, text
    line = one_error_line(text)
    assert needle in line and "build --help" in line
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["frobnicate"], "No such command"),
    (["run", "somewhere"], "Missing option '--prompt'"),
    (["verify"], "Missing argument 'ARTIFACT'"),
])
def test_usage_errors_are_one_error_line_and_exit_1(args, needle):
    code, text = run_cli(*args)
    assert code == 1, text
    assert needle in one_error_line(text)


def test_help_and_version_still_exit_0():
    assert run_cli("--version")[0] == 0
    code, text = run_cli("build", "--help")
    assert code == 0 and "Usage:" in text


def test_the_real_process_exits_1_with_one_line_on_stderr(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edgeq.cli", "build", str(tmp_path), "-o", str(tmp_path / "o"),
                        "--format", "tflite"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""
    assert [line for line in r.stderr.splitlines() if line.strip()] == [one_error_line(r.stderr)]


def test_a_signal_inside_the_import_system_is_sent_again_not_dropped(monkeypatch):
    # an exception raised in importlib's weakref callback is printed and dropped by Python: the
    # handler re-sends the signal instead of raising there (elsewhere it raises as usual)
    import signal
    import types

    from edgeq import cli

    sent = []
    monkeypatch.setattr("os.kill", lambda pid, sig: sent.append(sig))
    frozen = types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename="<frozen importlib._bootstrap>"))
    assert cli._raise_terminated(signal.SIGTERM, frozen) is None
    import time

    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [signal.SIGTERM]
    normal = types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename=__file__))
    with pytest.raises(cli.Terminated):
        cli._raise_terminated(signal.SIGTERM, normal)
    with pytest.raises(KeyboardInterrupt):
        cli._raise_terminated(signal.SIGINT, normal)


def test_a_signal_inside_a_c_callback_is_sent_again_not_dropped(monkeypatch):
    # ctypes prints and drops an exception raised in a callback (llama.cpp's log callback: a
    # SIGTERM there let a build run on, seen in CI): the handler re-sends the signal instead
    import signal
    import sys
    import time

    from edgeq import cli
    from edgeq.interrupts import no_raise_here

    sent = []
    monkeypatch.setattr("os.kill", lambda pid, sig: sent.append(sig))

    @no_raise_here
    def callback():
        return sys._getframe()

    def ordinary():
        return sys._getframe()

    assert cli._raise_terminated(signal.SIGTERM, callback()) is None
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [signal.SIGTERM]
    with pytest.raises(cli.Terminated):
        cli._raise_terminated(signal.SIGTERM, ordinary())


def test_llama_cpp_log_callback_is_marked_as_a_place_not_to_raise(tmp_path):
    # the frames llama.cpp's log callback runs in (caught as llama.cpp rejects a bad file) are
    # ones the signal handler will not raise in
    import sys

    from edgeq.errors import EdgeqError
    from edgeq.interrupts import must_not_raise_in
    from runtimes.llamacpp import LlamaCppSession

    pytest.importorskip("llama_cpp")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    frames = []

    def profile(frame, event, arg):  # noqa: ARG001
        if event == "call" and frame.f_code.co_filename.endswith("llamacpp.py") and frame.f_code.co_name == "_cb":
            frames.append(frame)

    sys.setprofile(profile)
    try:
        with pytest.raises(EdgeqError):
            LlamaCppSession(bad)
    finally:
        sys.setprofile(None)
    assert frames, "llama.cpp logged nothing for a bad file"
    assert all(must_not_raise_in(f) for f in frames)
