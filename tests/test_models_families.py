"""The decoder families against transformers' own classes: tiny random checkpoints written by
``XConfig`` + ``AutoModelForCausalLM.save_pretrained`` load into gptft with equal logits (with and
without padding), equal greedy generations, and come back out of ``save_pretrained`` unchanged."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from gptft.errors import GPTFTError
from gptft.generate import generate
from gptft.model import IGNORE_INDEX, GPTConfig
from gptft.models import (
    PRESETS,
    Decoder,
    DecoderConfig,
    build_model,
    config_from_dict,
    config_from_hf,
    from_pretrained,
    preset_config,
)

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*original_max_position_embeddings.*")

VOCAB = 1000
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def hf_config(family: str):
    """Each family's tiny config, with the features that make it differ from Llama switched on."""
    t = transformers
    if family == "llama":
        return t.LlamaConfig(**COMMON, rope_theta=500000.0, tie_word_embeddings=True, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))
    if family == "qwen2":
        return t.Qwen2Config(**COMMON, rope_theta=1e6)
    if family == "qwen3":
        return t.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True)  # head_dim != 64/4
    if family == "mistral":
        return t.MistralConfig(**COMMON, sliding_window=8)  # smaller than every test sequence
    if family == "gemma3_text":
        return t.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                  layer_types=["sliding_attention", "full_attention",
                                               "sliding_attention"],
                                  final_logit_softcapping=2.0)
    raise AssertionError(family)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3_text"]


def hf_model(family: str, seed: int = 0):
    """transformers' model of the family, eval mode, norms and biases moved off their init values
    (so that Gemma's 1 + w, and biases, are exercised)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture(params=FAMILIES)
def pair(request, tmp_path):
    """(transformers' model, gptft's model loaded from its save_pretrained folder, the folder)."""
    hf = hf_model(request.param)
    folder = tmp_path / request.param
    hf.save_pretrained(folder)
    return hf, from_pretrained(folder).eval(), folder


def test_logits_equal_transformers_without_and_with_padding(pair):
    hf, model, _ = pair
    ids = torch.randint(0, VOCAB, (3, 24))
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
        lengths = torch.tensor([24, 17, 9])
        right = (torch.arange(24)[None] < lengths[:, None]).long()
        left = right.flip(1)
        for mask in (left, right):
            real = mask.bool()
            expected = hf(ids, attention_mask=mask).logits[real]
            assert_close(model(ids, attention_mask=mask)[real], expected, atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers(pair):
    hf, model, _ = pair
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 12, 9)]
    ours = generate(model, prompts, 32)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    hf.generation_config.eos_token_id = None  # 32 tokens for every row, as ours
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert ours == out[:, width:].tolist()


def test_save_pretrained_loads_back_in_transformers(pair, tmp_path):
    _, model, _ = pair
    with torch.no_grad():  # a "fine-tuned" model: every weight moved
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back).__name__ == json.loads((tmp_path / "export" / "config.json").read_text())[
        "architectures"][0]
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert_close(back(ids).logits, model(ids), atol=1e-4, rtol=0)
    again = from_pretrained(tmp_path / "export")
    assert again.config == model.config
    assert DecoderConfig(**model.config.to_dict()) == model.config


def test_sharded_and_bf16_checkpoints_load(tmp_path):
    hf = hf_model("qwen3")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert_close(from_pretrained(tmp_path / "sharded")(ids), hf(ids).logits, atol=1e-4, rtol=0)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = from_pretrained(tmp_path / "bf16")
    assert model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight is model.embed_tokens.weight  # tied again after the meta build
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "bf16", dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert_close(model(ids), reference(ids).logits, atol=1e-4, rtol=0)
    assert from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def _folder_with(tmp_path, config: dict, family: str = "qwen3"):
    folder = tmp_path / "bad"
    hf_model(family).save_pretrained(folder)
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, **config}))
    return folder


def test_unsupported_model_types_and_features_are_named(tmp_path):
    with pytest.raises(GPTFTError, match=r"config.json: model_type 'falcon' is not supported; "
                                         r"supported: gpt2, llama, qwen2, qwen3, mistral, gemma3_text"):
        from_pretrained(_folder_with(tmp_path, {"model_type": "falcon"}))
    hf = hf_config("llama").to_dict()
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    hf["num_local_experts"] = 8
    with pytest.raises(GPTFTError, match=r"cfg: unsupported llama config: mixture-of-experts models "
                                         r"are not supported; rope type 'yarn' is not supported"):
        config_from_hf(hf, "cfg")
    del hf["hidden_size"], hf["num_local_experts"], hf["rope_parameters"]
    hf.update(rms_norm_eps="small", num_attention_heads=4.0)
    with pytest.raises(GPTFTError, match="cfg: unsupported llama config: missing key 'hidden_size'; "
                                         "num_attention_heads must be a positive integer \\(got 4.0\\); "
                                         "rms_norm_eps must be a number \\(got 'small'\\)$"):
        config_from_hf(hf, "cfg")


def test_weights_that_do_not_match_the_config_are_one_error(tmp_path):
    folder = _folder_with(tmp_path, {"intermediate_size": 96, "num_hidden_layers": 4})
    with pytest.raises(GPTFTError) as e:
        from_pretrained(folder)
    message = str(e.value)
    assert message.startswith(f"{folder}: weights do not match the model config: ")
    assert "layers.0.mlp.down_proj.weight has shape (64, 128), the config needs (64, 96)" in message
    assert message.endswith("; and 16 more") and "\n" not in message  # 3 x 3 MLP shapes + layer 3's 11


def test_old_style_config_json_reads_the_same(tmp_path):
    """``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` / ``sliding_window_pattern``
    (config.json files written before transformers 5) give the same configs."""
    llama = hf_config("llama").to_dict()
    rope = llama.pop("rope_parameters")
    old = {**llama, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}
    assert config_from_hf(old) == config_from_hf(hf_config("llama").to_dict())
    gemma = hf_config("gemma3_text").to_dict()
    new = config_from_hf(gemma)
    del gemma["rope_parameters"], gemma["layer_types"]
    gemma.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=2)
    assert config_from_hf(gemma) == new


def test_pooled_hidden_states_equal_the_full_pass_with_gradients():
    for family in ("qwen3", "gemma3_text"):  # q/k norm, GQA; sliding window and sandwich norms
        hf = hf_config(family).to_dict()
        model = build_model(config_from_hf(hf, drop_rate=0.0))
        ids = torch.randint(0, VOCAB, (3, 20))
        positions = torch.tensor([19, 4, 11])
        full = model.hidden_states(ids)[torch.arange(3), positions]
        full.sum().backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        pooled = model.pooled_hidden_states(ids, positions)
        pooled.sum().backward()
        assert_close(pooled, full, atol=1e-5, rtol=1e-5)
        for n, p in model.named_parameters():  # gradients of a sum over 3 x 64 outputs: large
            scale = max(1.0, expected[n].abs().max().item())
            assert_close(p.grad, expected[n], atol=1e-5 * scale, rtol=1e-5, msg=n)


def test_selective_cross_entropy_equals_cross_entropy_and_trains():
    model = build_model(config_from_hf(hf_config("gemma3_text").to_dict(), pad_vocab_multiple=64))
    ids = torch.randint(0, VOCAB, (2, 16))
    labels = ids.clone()
    labels[0, :9] = IGNORE_INDEX
    labels[1, ::2] = IGNORE_INDEX
    logits = model(ids)
    assert logits.shape == (2, 16, VOCAB)
    expected = torch.stack([F.cross_entropy(logits[r], labels[r], reduction="sum") for r in range(2)])
    loss = model(ids, labels=labels)
    assert_close(loss, expected)
    small_chunks = model.selective_cross_entropy(model.hidden_states(ids), labels, chunk_size=3)
    assert_close(small_chunks, expected)
    small_chunks.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_last_hidden_state_and_kv_cache_equal_the_full_pass():
    from gptft.model import KVCache

    model = build_model(config_from_hf(hf_config("mistral").to_dict())).eval()
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model.hidden_states(ids)
        cache = KVCache(2, 20)
        first = model.last_hidden_state(ids[:, :12], kv_cache=cache)
        steps = [model.last_hidden_state(ids[:, t : t + 1], kv_cache=cache) for t in range(12, 20)]
    assert_close(first, full[:, 11], atol=1e-5, rtol=0)
    assert_close(torch.stack(steps, 1), full[:, 12:], atol=1e-5, rtol=0)


def test_the_model_interface():
    model = build_model(config_from_hf(hf_config("qwen3").to_dict()))
    assert model.architecture == "qwen3" and model.hf_prefix == "model."
    assert model.blocks is model.layers and model.block_class is type(model.layers[0])
    assert model.final_norm is model.norm and model.embedding is model.embed_tokens
    assert model.lm_head.weight is model.embed_tokens.weight  # tied in this config
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {f"layers.0.{p}" for p in model.peft_layers} <= linear
    c = model.config
    assert (c.emb_dim, c.n_layers, c.n_heads, c.context_length, c.padded_vocab_size) == (64, 3, 4, 128, VOCAB)
    hf_names = set(hf_model("qwen3").state_dict())
    assert set(model.hf_state_dict()) == hf_names - {"lm_head.weight"}
    assert model.num_parameters() == sum(p.numel() for p in hf_model("qwen3").parameters())


def test_random_init_is_transformers_scheme():
    cfg = config_from_hf(hf_config("gemma3_text").to_dict(), initializer_range=0.05)
    model = Decoder(cfg)
    assert (model.norm.weight == 0).all() and (model.layers[0].self_attn.q_norm.weight == 0).all()
    assert abs(model.layers[0].mlp.up_proj.weight.std().item() - 0.05) < 0.005
    assert (model.embed_tokens.weight[0] == 0).all()  # Gemma's pad_token_id 0
    qwen2 = Decoder(config_from_hf(hf_config("qwen2").to_dict()))
    assert (qwen2.norm.weight == 1).all() and (qwen2.layers[0].self_attn.q_proj.bias == 0).all()


def test_config_from_dict_round_trips_and_names_problems():
    cfg = config_from_hf(hf_config("gemma3_text").to_dict())
    assert config_from_dict("gemma3_text", json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert config_from_dict("gpt2", GPTConfig(n_layers=2).to_dict()) == GPTConfig(n_layers=2)
    with pytest.raises(GPTFTError, match="gptft.json: architecture 'falcon' is not supported"):
        config_from_dict("falcon", {})
    with pytest.raises(GPTFTError, match="model: unknown key.*wings"):
        config_from_dict("qwen3", {**cfg.to_dict(), "wings": 2})
    with pytest.raises(GPTFTError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        config_from_dict("gemma3_text", {**cfg.to_dict(), "n_kv_heads": 3})
    with pytest.raises(GPTFTError, match=r"emb_dim must be a positive integer \(got 0\)"):
        DecoderConfig(**{**cfg.to_dict(), "emb_dim": 0})
    with pytest.raises(GPTFTError, match=r"architecture 'gpt3' is not one of llama, qwen2"):
        DecoderConfig(**{**cfg.to_dict(), "architecture": "gpt3"})


# Parameter counts of the real checkpoints, as their model cards / transformers report them.
PRESET_PARAMETERS = {"smollm2-135m": 134_515_008, "qwen3-0.6b": 596_049_920,
                     "llama-3.2-1b": 1_235_814_400, "qwen2.5-0.5b": 494_032_768}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_the_real_shapes(name):
    cfg = preset_config(name)
    hf_cls = transformers.AutoConfig.for_model(PRESETS[name]["hf"]["model_type"])
    hf = hf_cls.__class__(**{k: v for k, v in PRESETS[name]["hf"].items() if k != "model_type"})
    with torch.device("meta"):
        ours = Decoder(cfg).num_parameters()
        theirs = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf).parameters())
    assert ours == theirs
    if name in PRESET_PARAMETERS:
        assert ours == PRESET_PARAMETERS[name]
    assert preset_config(name, drop_rate=0.1).drop_rate == 0.1


def test_hub_repo_ids_from_the_cache_and_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    with pytest.raises(GPTFTError, match=r"could not get model 'Org/tiny-qwen3' \(hub repo Org/tiny-qwen3; "
                                         r"HF_HUB_OFFLINE is set and it is not in the cache"):
        from_pretrained("Org/tiny-qwen3")
    snapshot = cache / "models--Org--tiny-qwen3" / "snapshots" / ("a" * 40)
    hf = hf_model("qwen3")
    hf.save_pretrained(snapshot)
    (cache / "models--Org--tiny-qwen3" / "refs").mkdir()
    (cache / "models--Org--tiny-qwen3" / "refs" / "main").write_text("a" * 40)
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert_close(from_pretrained("Org/tiny-qwen3")(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_a_shared_prompt_prefix_generates_as_transformers(family, tmp_path):
    """generate() computes a prefix shared by the batch once and copies its keys/values after
    each row's left padding: positions and sliding windows must come out as transformers'."""
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    prefix = torch.randint(0, VOCAB, (7,)).tolist()
    prompts = [prefix + torch.randint(0, VOCAB, (n,)).tolist() for n in (1, 6, 3)]
    ours = generate(model, prompts, 12)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    hf.generation_config.eos_token_id = None
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours == out[:, width:].tolist()


@pytest.mark.parametrize("family", ["qwen2", "gemma3_text"])
def test_a_classifier_exports_as_sequence_classification(family, tmp_path):
    """The seam a classifier export uses: ``to_hf_config(classifier=True)`` + the body's
    ``hf_state_dict()`` (no ``lm_head``) + ``score.weight`` load in
    ``AutoModelForSequenceClassification``, which pools the last real token as
    ``pooled_hidden_states`` does."""
    from gptft.io import save_safetensors, write_json
    from gptft.models.families import to_hf_config

    model = build_model(config_from_hf(hf_config(family).to_dict(), pad_token_id=0)).eval()
    score = torch.nn.Linear(64, 3, bias=False)
    state = {k: v for k, v in model.hf_state_dict().items() if not k.startswith("lm_head.")}
    save_safetensors({**state, "score.weight": score.weight.detach()}, tmp_path / "model.safetensors")
    write_json(tmp_path / "config.json", {**to_hf_config(model.config, classifier=True), "num_labels": 3})
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    lengths = torch.tensor([14, 6, 10])
    ids = torch.randint(1, VOCAB, (3, 14)).masked_fill(torch.arange(14)[None] >= lengths[:, None], 0)
    with torch.no_grad():
        ours = score(model.pooled_hidden_states(ids, lengths - 1))
        assert_close(hf(ids).logits, ours, atol=1e-4, rtol=0)
