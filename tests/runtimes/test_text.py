"""runtimes/text.py: a SpecTokenizer keeps only what it needs once built (the tokenizers object,
EOS ids, BOS / EOS token text, chat template) — not the vocabulary's Python objects — and tokenizes,
detokenizes, finds EOS and renders the chat exactly as from the full spec (the ``tokenizers``
library on the same tokenizer.json is the oracle)."""
from tokenizers import Tokenizer

from edgeq.frontend import load_model
from edgeq.tokenizer_pack import eos_ids
from runtimes.text import SpecTextMixin, SpecTokenizer, render_chat

TEXT = "The quick brown fox, naïve café 東京 🙂 <|im_end|> jumps.\n  Over 12,345 lazy dogs."


def test_spec_tokenizer_keeps_a_slim_spec_and_tokenizes_as_the_full_one(smollm2_dir):
    spec = load_model(smollm2_dir).tokenizer
    tok = SpecTokenizer(spec)
    oracle = Tokenizer.from_str(spec.tokenizer_json)
    assert tok.encode(TEXT, add_special=False) == oracle.encode(TEXT, add_special_tokens=False).ids
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=True)
    assert tok.eos_ids == eos_ids(spec) and spec.eos_id in tok.eos_ids and len(tok.eos_ids) >= 1
    assert tok.chat("hi there") == render_chat(spec, "hi there") and "hi there" in tok.chat("hi there")
    slim = tok.spec
    assert slim.tokenizer_json == "" and slim.merges == () and slim.token_types == ()
    assert sum(map(len, slim.tokens)) <= len(spec.tokens[spec.eos_id]) + len(spec.tokens[spec.bos_id or 0])
    assert len(slim.tokens) == len(spec.tokens) and spec.merges  # the caller's spec is untouched


def test_a_session_drops_its_full_spec_once_the_tokenizer_is_built(smollm2_dir):
    spec = load_model(smollm2_dir).tokenizer

    class Session(SpecTextMixin):
        _spec = None

        def _tokenizer_spec(self):
            if self._spec is None:
                self._spec = spec
            return self._spec

    s = Session()
    assert s.tokenize(TEXT) == SpecTokenizer(spec).encode(TEXT)
    assert s._spec is s.tokenizer.spec and s._spec.tokenizer_json == ""
    assert s.eos_ids == eos_ids(spec) and s.apply_chat_template("x") == render_chat(spec, "x")
