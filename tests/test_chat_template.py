"""Chat templates (edgeq/chat_template.py, `edgeq build --chat-template`): the built-in templates
render as llama.cpp's own built-in renderers do (llama_chat_apply_template detects the family from
the template text and formats the turns with its C++ code: an independent oracle); a build
attaches a template to every format (GGUF metadata read back with gguf-py; the sessions render
it); bad templates are one error line before the build; `edgeq run --chat` says when an artifact
has no template."""
import ctypes
import json
import shutil

import pytest
from click.testing import CliRunner

from edgeq.chat_template import BUILTIN, check, render, render_messages, resolve
from edgeq.cli import main
from edgeq.errors import EdgeqError

CONVERSATIONS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


def _llama_cpp(template: str, messages: list[dict]) -> str:
    import llama_cpp

    arr = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(8192)
    n = llama_cpp.llama_chat_apply_template(template.encode(), arr, len(messages), True, buf, len(buf))
    assert 0 < n <= len(buf)
    return buf.raw[:n].decode()


@pytest.mark.parametrize("name", sorted(BUILTIN))
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "system-and-turns"])
def test_builtin_templates_render_as_llama_cpp_does(name, messages):
    assert render_messages(BUILTIN[name][0], messages) == _llama_cpp(BUILTIN[name][0], messages)


def test_resolve_and_check_refuse_bad_templates(tmp_path):
    with pytest.raises(EdgeqError, match="neither a built-in"):
        resolve("no-such-template")
    big = tmp_path / "big.jinja"
    big.write_text("x" * (65 * 1024))
    with pytest.raises(EdgeqError, match="over 64 KB"):
        resolve(str(big))
    binary = tmp_path / "bin.jinja"
    binary.write_bytes(b"\xff\xfe{{")
    with pytest.raises(EdgeqError, match="not UTF-8"):
        resolve(str(binary))
    with pytest.raises(EdgeqError, match="chat template"):
        render("{% for m in messages %}", "x")  # a syntax error
    with pytest.raises(EdgeqError, match="does not contain the user's message"):
        check("f.jinja", "<start>", None)
    with pytest.raises(EdgeqError, match="<|im_start|>.*not in this model's vocabulary"):
        check("chatml", BUILTIN["chatml"][0], ["<start_of_turn>", "<end_of_turn>", "a"])
    check("gemma", BUILTIN["gemma"][0], ["<start_of_turn>", "<end_of_turn>", "a"])  # accepted


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_build_attaches_a_template_to_gguf_and_reference_artifacts(tiny_gemma3, tmp_path):
    import gguf

    from edgeq.artifact import read_manifest
    from edgeq.session import open_session

    want = BUILTIN["gemma"][0]
    assert json.loads((tiny_gemma3 / "tokenizer_config.json").read_text())["chat_template"] != want
    for fmt, extra in (("gguf", ["--bits", "8"]), ("reference", [])):
        out = tmp_path / fmt
        r = _cli("build", tiny_gemma3, "--target", "cpu-avx2", "--format", fmt, *extra, "--chat-template", "gemma",
                 "--no-goldens", "--out", out)
        assert r.exit_code == 0, r.output
        m = read_manifest(out)
        assert m["options"]["chat_template"] == "gemma"
        assert any(s["name"] == "chat_template" for s in m["steps"])
        if fmt == "gguf":
            reader = gguf.GGUFReader(next(out.glob("*.gguf")))
            field = reader.fields["tokenizer.chat_template"]
            assert bytes(field.parts[field.data[0]]).decode() == want
        with open_session(out) as s:
            assert s.has_chat_template
            assert s.apply_chat_template("hi") == render(want, "hi")


def test_a_builtin_for_another_family_is_refused(tiny_llama, tmp_path):
    r = _cli("build", tiny_llama, "--target", "cpu-avx2", "--format", "reference", "--chat-template", "gemma",
             "--no-goldens", "--out", tmp_path / "a")
    assert r.exit_code == 1
    assert sum(line.startswith("error:") for line in r.output.splitlines()) == 1 and "Traceback" not in r.output
    assert "error: --chat-template gemma: <start_of_turn>, <end_of_turn> not in this model's vocabulary" in r.output
    assert not (tmp_path / "a").exists()


def test_a_template_file_is_read_and_checked_before_the_build(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% if %}")
    r = _cli("build", tiny_llama, "--target", "cpu-avx2", "--format", "reference", "--chat-template", bad,
             "--no-goldens", "--out", tmp_path / "a")
    assert r.exit_code == 1 and "error: chat template:" in r.output and "Traceback" not in r.output
    good = tmp_path / "turns.jinja"
    good.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    r = _cli("build", tiny_llama, "--target", "cpu-avx2", "--format", "reference", "--chat-template", good,
             "--no-goldens", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    from edgeq.artifact import read_manifest
    from edgeq.session import open_session

    assert read_manifest(tmp_path / "b")["options"]["chat_template"] == "turns.jinja"
    with open_session(tmp_path / "b") as s:
        assert s.apply_chat_template("hi") == "[user] hi\n[assistant] "


def test_run_notes_an_artifact_without_a_template(tiny_llama, tmp_path):
    model = tmp_path / "plain"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "a"
    assert _cli("build", model, "--target", "cpu-avx2", "--format", "reference", "--no-goldens",
                "--out", out).exit_code == 0
    r = CliRunner().invoke(main, ["run", str(out), "--prompt", "hello", "--max-tokens", "2"], catch_exceptions=False)
    assert r.exit_code == 0
    assert "note: the artifact has no chat template" in r.output
    r = CliRunner().invoke(main, ["run", str(out), "--prompt", "hello", "--max-tokens", "2", "--raw"],
                           catch_exceptions=False)
    assert r.exit_code == 0 and "note:" not in r.output
