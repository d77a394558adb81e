import json

import pytest
import torch
from torch.testing import assert_close

from gptft import GPT, GPTConfig, GPTFTError, KVCache

transformers = pytest.importorskip("transformers")


def hf_tiny(tmp_path, **kw):
    cfg = transformers.GPT2Config(
        vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw,
    )
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_preset_parameter_count():
    with torch.device("meta"):  # the count, without 0.5 GB of initialised weights
        model = GPT(GPTConfig.from_name("gpt2-small"))
    assert model.num_parameters() == 124_439_808


def test_presets_and_validation():
    assert GPTConfig.from_name("gpt2-xl").emb_dim == 1600
    assert GPTConfig.from_name("gpt2-medium", drop_rate=0.1).drop_rate == 0.1
    with pytest.raises(GPTFTError, match="unknown model 'gpt3'"):
        GPTConfig.from_name("gpt3")
    with pytest.raises(GPTFTError, match="emb_dim .* divisible by n_heads"):
        GPTConfig(emb_dim=30, n_heads=4)
    with pytest.raises(GPTFTError, match="n_layers must be a positive integer.*drop_rate"):
        GPTConfig(n_layers=0, drop_rate=1.5)


def test_parameter_names_are_gpt2s(tiny_config):
    names = set(GPT(tiny_config).state_dict())
    for n in ("wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.1.attn.c_attn.bias",
              "h.0.attn.c_proj.weight", "h.0.ln_2.bias", "h.0.mlp.c_fc.weight",
              "h.0.mlp.c_proj.bias", "ln_f.weight", "lm_head.weight"):
        assert n in names
    model = GPT(tiny_config)
    assert model.lm_head.weight is model.wte.weight


def test_from_pretrained_matches_transformers(tmp_path):
    hf, folder = hf_tiny(tmp_path)
    ours = GPT.from_pretrained(folder).eval()
    ids = torch.randint(0, 50257, (3, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_save_pretrained_loads_in_transformers(tmp_path, tiny_config):
    ours = GPT(tiny_config).eval()
    ours.save_pretrained(tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert_close(hf(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


def test_padded_vocab_round_trip(tmp_path):
    hf, folder = hf_tiny(tmp_path)
    ours = GPT.from_pretrained(folder, pad_vocab_multiple=64).eval()
    assert ours.wte.weight.shape[0] == 50304
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        logits = ours(ids)
        assert logits.shape == (2, 9, 50257)
        assert_close(logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "again")
    back = GPT.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert_close(back(ids), logits, atol=1e-6, rtol=1e-6)


def test_right_padding_invariance(tiny_config):
    model = GPT(tiny_config).eval()
    a, b = torch.randint(0, 50257, (1, 7)), torch.randint(0, 50257, (1, 12))
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0, :7], batch[1] = a[0], b[0]
    mask = (torch.arange(12) < torch.tensor([[7], [12]])).long()
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        assert_close(out[0, :7], model(a)[0], atol=1e-5, rtol=1e-5)
        assert_close(out[1], model(b)[0], atol=1e-5, rtol=1e-5)
        assert_close(model.hidden_states(batch)[0, :7], model.hidden_states(a)[0])


def test_left_padding_invariance(tiny_config):
    model = GPT(tiny_config).eval()
    a = torch.randint(0, 50257, (1, 5))
    batch = torch.cat([torch.zeros(1, 4, dtype=torch.long), a], dim=1)
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        assert torch.isfinite(out).all()
        assert_close(out[0, 4:], model(a)[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_forward(tiny_config):
    model = GPT(tiny_config).eval()
    ids = torch.randint(0, 50257, (2, 15))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(batch_size=2, max_length=15)
        steps = [model(ids[:, :6], kv_cache=cache)]  # prefill
        steps += [model(ids[:, 6:9], kv_cache=cache)]  # several tokens with a past
        steps += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(9, 15)]
    assert cache.length == 15
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_with_left_padding(tiny_config):
    model = GPT(tiny_config).eval()
    ids = torch.randint(0, 50257, (1, 8))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 8)], dim=1).long()
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(1, 11)
        first = model(padded[:, :7], attention_mask=mask[:, :7], kv_cache=cache)
        rest = [model(padded[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache)
                for t in range(7, 11)]
    assert_close(torch.cat([first[:, 3:], *rest], dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_an_error(tiny_config):
    model = GPT(tiny_config).eval()
    cache = KVCache(1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_weights_that_do_not_match_the_config(tmp_path):
    _, folder = hf_tiny(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_embd"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GPTFTError, match=r"weights do not match.*wte.weight has shape"):
        GPT.from_pretrained(folder)


def test_broken_and_missing_checkpoints(tmp_path):
    _, folder = hf_tiny(tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(GPTFTError, match="model.safetensors: not a readable safetensors"):
        GPT.from_pretrained(folder)
    weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(GPTFTError, match="reads safetensors only"):
        GPT.from_pretrained(folder)
    with pytest.raises(GPTFTError, match="not a folder and not a known model"):
        GPT.from_pretrained(tmp_path / "nope")


def test_hub_name_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import importlib

    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    importlib.import_module("gptft.hub")
    with pytest.raises(GPTFTError, match=r"could not get model 'gpt2-small' \(hub repo "
                                          r"openai-community/gpt2.*local folder"):
        GPT.from_pretrained("gpt2-small")


def test_pooled_hidden_states_equal_the_full_pass(tiny_config):
    model = GPT(tiny_config)
    ids = torch.randint(0, 50257, (3, 10))
    positions = torch.tensor([9, 4, 0])
    full = model.hidden_states(ids)[torch.arange(3), positions]
    full.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pooled = model.pooled_hidden_states(ids, positions)
    pooled.sum().backward()
    assert_close(pooled, full, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        assert_close(p.grad, expected[n], atol=1e-5, rtol=1e-5, msg=n)
