"""A token's own bytes (OpenAI's logprobs `bytes`): the bytes of a
sequence's tokens, joined, are its text, even where one token holds only
part of a character and its text alone is U+FFFD or empty."""

from types import SimpleNamespace

from mlx_lm.utils import load_tokenizer

from exod.models import synthetic
from exod.runner.sequences import token_bytes


def test_byte_level_bpe_tokens_join_to_the_text(tmp_path):
    tokenizer = load_tokenizer(synthetic.ensure_named("demo", tmp_path))
    detokenizer = tokenizer.detokenizer
    text = "héllo wörld, 日本語 and 🙂 tokens"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [token_bytes(tokenizer, detokenizer, t) for t in ids]
    assert b"".join(pieces).decode() == tokenizer.decode(ids) == text
    # Some token is part of a character: its bytes are not UTF-8 alone.
    partial = [p for p in pieces if not _utf8(p)]
    assert partial, "the text should need a token that splits a character"


def test_sentencepiece_pieces_are_bytes_with_a_space_for_u2581():
    detokenizer = SimpleNamespace(tokenmap=["\u2581hello".encode(), b"\xe6", "\u2581".encode()])
    assert token_bytes(None, detokenizer, 0) == b" hello"
    assert token_bytes(None, detokenizer, 1) == b"\xe6"
    assert token_bytes(None, detokenizer, 2) == b" "


def test_without_a_piece_table_the_decoded_text():
    tokenizer = SimpleNamespace(decode=lambda ids: f"<{ids[0]}>")
    assert token_bytes(tokenizer, SimpleNamespace(), 7) == b"<7>"
    assert token_bytes(None, SimpleNamespace(), 7) == b""


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False
