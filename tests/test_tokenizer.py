import pytest

from gptft import GPTFTError, Tokenizer


def test_gpt2_encoding():
    tok = Tokenizer()
    ids = tok.encode("Every effort moves you")
    assert ids == [6109, 3626, 6100, 345]
    assert tok.decode(ids) == "Every effort moves you"
    assert tok.encode_batch(["Every effort", " moves you"]) == [[6109, 3626], [6100, 345]]


def test_end_of_text_comes_from_the_encoding():
    tok = Tokenizer()
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    # user text containing the marker stays ordinary text
    assert tok.eot_id not in tok.encode("hi <|endoftext|> there")


def test_other_encodings_missing_files_mention_the_cache_variable(monkeypatch, tmp_path):
    import tiktoken.load

    def offline(*_a, **_k):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(GPTFTError, match="TIKTOKEN_CACHE_DIR"):
        Tokenizer("r50k_base")
    assert Tokenizer("gpt2").encode("Every effort") == [6109, 3626]  # gptft's own files: no download
