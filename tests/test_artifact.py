"""Files an artifact names must stay inside the artifact directory (issue 18, defect 2).

A manifest rewritten to name ``../../etc/passwd``, an absolute path, or a symlink leaving the
directory is refused with one ``error:`` line before anything is opened, by every command that
reads artifacts (verify, run, profile, eval, inspect).
"""
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from edgeq.artifact import (MANIFEST, artifact_path, check_manifest_paths, manifest_file_names, read_manifest,
                            read_tokenizer_spec, write_tokenizer_spec)
from edgeq.cli import main
from edgeq.errors import EdgeqError
from edgeq.frontend import load_model


def run_cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def built(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "q8"
    code, text = run_cli("build", tiny_llama, "--bits", "8", "-o", out)
    assert code == 0, text
    return out


COMMANDS = {
    "verify": [],
    "run": ["--prompt", "hi", "--max-tokens", "2", "--raw"],
    "profile": ["--runs", "1", "--max-tokens", "2"],
    "eval": ["--tasks", "wikitext", "--ppl-tokens", "64"],
    "inspect": ["--tensors"],
}


def _edit_manifest(art, fn):
    p = art / MANIFEST
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def _hostile(kind, art, outside):
    """Make ``art`` name a file outside itself; ``outside`` is a valid copy of its GGUF elsewhere,
    so following the name would *work* (the refusal cannot come from a later parse error)."""
    rel = os.path.relpath(outside, art)
    if kind == "dotdot-model":
        _edit_manifest(art, lambda m: m.update(model_file=rel))
    elif kind == "passwd-files-table":
        def f(m):
            m["files"]["../../../../etc/passwd"] = m["files"].pop("model.gguf")
            m["model_file"] = "../../../../etc/passwd"
        _edit_manifest(art, f)
    elif kind == "absolute-model":
        _edit_manifest(art, lambda m: m.update(model_file=str(outside)))
    elif kind == "adapter":
        _edit_manifest(art, lambda m: m.update(adapter_files=[rel]))
    elif kind == "goldens":
        _edit_manifest(art, lambda m: m["goldens"].update(file="../goldens.json"))
    elif kind == "symlink":
        (art / "model.gguf").unlink()
        (art / "model.gguf").symlink_to(outside)
    elif kind == "symlinked-dir":
        (art / "sub").symlink_to(outside.parent, target_is_directory=True)
        _edit_manifest(art, lambda m: m.update(model_file=f"sub/{outside.name}"))
    else:  # pragma: no cover
        raise AssertionError(kind)


KINDS = ["dotdot-model", "passwd-files-table", "absolute-model", "adapter", "goldens", "symlink", "symlinked-dir"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_manifest_naming_files_outside(built, tmp_path, command, kind, monkeypatch):
    art = tmp_path / "art"
    shutil.copytree(built, art)
    outside = tmp_path / "elsewhere" / "model.gguf"
    outside.parent.mkdir()
    shutil.copyfile(built / "model.gguf", outside)
    shutil.copyfile(built / "goldens.json", tmp_path / "goldens.json")
    _hostile(kind, art, outside)

    import runtimes.llamacpp
    import runtimes.reference

    def no_open(*a, **k):
        raise AssertionError("a runtime was started on a hostile artifact")

    monkeypatch.setattr(runtimes.llamacpp, "LlamaCppSession", no_open)
    monkeypatch.setattr(runtimes.reference, "ReferenceSession", no_open)
    code, text = run_cli(command, art, *COMMANDS[command])
    assert code == 1, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "outside the artifact directory" in errors[0], text
    assert "Traceback" not in text


def test_the_untouched_copy_still_works(built, tmp_path):
    """The same commands on an unmodified copy succeed (the refusals above are not blanket)."""
    art = tmp_path / "art"
    shutil.copytree(built, art)
    for command in ("verify", "run", "inspect"):
        code, text = run_cli(command, art, *COMMANDS[command])
        assert code == 0, (command, text)


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "", "C:\\x", "a\\..\\x", "\\\\host\\share",
                                  "x\x00y", None, 3, ["x"]])
def test_artifact_path_refuses(tmp_path, name):
    with pytest.raises(EdgeqError):
        artifact_path(tmp_path, name)


def test_artifact_path_allows_inside_names_and_inside_symlinks(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").symlink_to("a.gguf")
    (tmp_path / "sub").mkdir()
    assert artifact_path(tmp_path, "a.gguf") == tmp_path / "a.gguf"
    assert artifact_path(tmp_path, "b.gguf") == tmp_path / "b.gguf"
    assert artifact_path(tmp_path, "sub/c.txt") == tmp_path / "sub" / "c.txt"
    assert artifact_path(tmp_path, "./a.gguf").resolve() == (tmp_path / "a.gguf").resolve()


# every field of every format's manifest that names a file (ONNX and TVM sections included: a
# TVM artifact's library is code, loaded into the process)
FIELDS = {
    "files": lambda m, v: m.update(files={v: {"sha256": "0", "bytes": 0}}),
    "model_file": lambda m, v: m.update(model_file=v),
    "adapter_files": lambda m, v: m.update(adapter_files=["ok.gguf", v]),
    "plan_file": lambda m, v: m.update(plan_file=v),
    "goldens.file": lambda m, v: m.update(goldens={"file": v}),
    "prune.files": lambda m, v: m.update(prune={"rates": [0, 0.5], "files": {"0": "ok.gguf", "0.5": v}}),
    "onnx.model_file": lambda m, v: m.update(onnx={"model_file": v}),
    "onnx.data_file": lambda m, v: m.update(onnx={"model_file": "model.onnx", "data_file": v}),
    "onnx.tokenizer_file": lambda m, v: m.update(onnx={"tokenizer_file": v}),
    "onnx.adapter_files": lambda m, v: m.update(onnx={"adapter_files": {"a": v}}),
    "tvm.library": lambda m, v: m.update(tvm={"library": v}),
    "tvm.weights_file": lambda m, v: m.update(tvm={"weights_file": v}),
    "tvm.tokenizer_file": lambda m, v: m.update(tvm={"tokenizer_file": v}),
}


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_read_manifest_refuses_any_field_naming_a_file_outside(tmp_path, field):
    m = {"schema_version": 1, "format": "tvm", "files": {}}
    FIELDS[field](m, "../../lib/libc.so.6")
    assert "../../lib/libc.so.6" in manifest_file_names(m)
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EdgeqError, match="outside the artifact directory"):
        read_manifest(tmp_path)
    FIELDS[field](m, "inside.bin")
    check_manifest_paths(tmp_path, m)  # the same field naming an inside file is fine


def test_onnx_graph_external_data_leaving_the_artifact_is_refused(tiny_llama, tmp_path):
    """The ONNX graph itself names its weight file; onnxruntime refuses a location that escapes
    the model directory, and edgeq reports it as one error line."""
    import onnx

    from edgeq.artifact import write_manifest

    art = tmp_path / "o"
    code, text = run_cli("build", tiny_llama, "--format", "onnx", "--bits", "8", "-o", art)
    assert code == 0, text
    shutil.copyfile(art / "model.onnx.data", tmp_path / "stolen.data")
    g = onnx.load(str(art / "model.onnx"), load_external_data=False)
    for t in g.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../stolen.data"
    onnx.save(g, str(art / "model.onnx"))
    m = read_manifest(art)
    m.pop("files")
    write_manifest(art, m)
    code, text = run_cli("run", art, "--prompt", "hi", "--max-tokens", "2", "--raw")
    assert code == 1, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "escapes model directory" in errors[0], text


@pytest.mark.parametrize("entry", [None, {"sha256": "0"}, {"bytes": "12", "sha256": "0"}, []])
def test_malformed_files_entry_is_a_problem_not_a_traceback(built, tmp_path, entry):
    art = tmp_path / "art"
    shutil.copytree(built, art)
    _edit_manifest(art, lambda m: m["files"].update({"model.gguf": entry}))
    code, text = run_cli("verify", art)
    assert code == 1 and "Traceback" not in text
    assert "FAIL model.gguf: malformed manifest entry" in text


def test_a_listed_directory_is_a_problem_not_a_traceback(built, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(built, art)
    (art / "model.gguf").unlink()
    (art / "model.gguf").mkdir()
    code, text = run_cli("verify", art)
    assert code == 1 and "FAIL model.gguf: not a file" in text, text


def test_a_files_table_that_is_not_an_object_is_one_error_line(built, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(built, art)
    _edit_manifest(art, lambda m: m.update(files=["model.gguf"]))
    code, text = run_cli("verify", art)
    assert code == 1
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "manifest.json: 'files' is not a JSON object" in errors[0], text


# ---- the tokenizer spec file (written by the ONNX / TVM lowerings, read by their runtimes) ----

def test_tokenizer_spec_round_trip(tiny_llama, tmp_path):
    ir = load_model(tiny_llama)
    write_tokenizer_spec(ir.tokenizer, tmp_path / "t.json")
    assert read_tokenizer_spec(tmp_path / "t.json") == ir.tokenizer
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    with pytest.raises(EdgeqError, match="tokenizer"):
        read_tokenizer_spec(tmp_path / "bad.json")
    with pytest.raises(EdgeqError, match="tokenizer"):
        read_tokenizer_spec(tmp_path / "missing.json")


def test_sentencepiece_tokenizer_spec_round_trip(tiny_gemma3, tmp_path):
    """A SentencePiece-style spec (Gemma 3) also writes its scores and add_space_prefix; both are
    read back and type-checked."""
    ir = load_model(tiny_gemma3)
    assert ir.tokenizer.scores is not None and ir.tokenizer.add_space_prefix is not None
    write_tokenizer_spec(ir.tokenizer, tmp_path / "t.json")
    assert read_tokenizer_spec(tmp_path / "t.json") == ir.tokenizer
    d = json.loads((tmp_path / "t.json").read_text())
    for key, bad in (("scores", d["scores"][:-1]), ("scores", ["x"] * len(d["scores"])), ("add_space_prefix", 1)):
        (tmp_path / "bad.json").write_text(json.dumps({**d, key: bad}))
        with pytest.raises(EdgeqError, match="corrupt tokenizer spec"):
            read_tokenizer_spec(tmp_path / "bad.json")


def test_a_signal_during_the_swap_waits_until_the_new_artifact_is_in_place(tmp_path):
    """The window a random signal rarely hits: SIGINT between the renames of a --force swap is
    delivered after the swap, so the directory is never missing."""
    import os
    import signal
    import threading

    import edgeq.artifact as art

    out = tmp_path / "a"
    out.mkdir()
    (out / "f").write_text("old")
    real_replace = os.replace
    seen = []

    def replace(src, dst):
        real_replace(src, dst)
        if not seen:  # right after the first rename: the old artifact moved away, the new not yet in
            seen.append(out.exists())
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # (not another thread of the process)

    art.os.replace = replace
    # Python's own SIGINT handler, whatever an earlier test in this process left installed (in the
    # full suite the handler was no longer the default by the time this test ran: the signal was
    # then held and re-raised into a non-default handler, and no KeyboardInterrupt came)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with art.atomic_directory(out, force=True) as tmp:
                (tmp / "f").write_text("new")
    finally:
        art.os.replace = real_replace
        signal.signal(signal.SIGINT, before)
    assert seen == [False]  # the signal did arrive inside the window
    assert (out / "f").read_text() == "new"  # and was delivered once the swap was complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_signal_while_the_temporary_directory_is_made_leaves_nothing(tmp_path, monkeypatch):
    """SIGINT after the temporary artifact directory exists but before atomic_directory holds its
    path: the directory goes with the interrupt (the stray .prev.tmp-* CI once found)."""
    import signal
    import tempfile
    import threading

    import edgeq.artifact as art

    real = tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        d = real(*a, **kw)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        return d

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as exc:  # (held: nothing may rely on collecting it)
            with art.atomic_directory(tmp_path / "a"):
                raise AssertionError("the body must not run")
    finally:
        signal.signal(signal.SIGINT, before)
    assert exc.type is KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
