import math
import os

import pytest
import torch

from gptft import GPT, GPTConfig, GPTFTError, KVCache
from gptft.cli import main
from gptft.config import GenerateConfig
from gptft.generate import generate, generate_texts, top_k_logits, top_p_filter
from gptft.runs import save_model

SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9, seed=7)


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(1)
    model = GPT(tiny_config).eval()
    with torch.no_grad():  # sharper, position-dependent logits than the default initialisation
        model.wte.weight.mul_(20)
        model.wpe.weight.normal_(0, 1)
    return model


def prompts_of(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 50257, (n,), generator=g).tolist() for n in lengths]


def naive_greedy(model: GPT, prompt: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """The book's loop: a full forward over the last context_length tokens, then argmax."""
    ctx = model.config.context_length
    ids, out = list(prompt[-(ctx - 1):]), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            hidden = model.hidden_states(torch.tensor([ids[-ctx:]]))  # no cache, no mask
            token = model.logits(hidden[0, -1]).argmax().item()
            if token == eos_id:
                break
            ids.append(token)
            out.append(token)
    return out


def test_greedy_matches_naive_loop(model):
    prompt = prompts_of(7)[0]
    got = generate(model, [prompt], 12)
    assert got == [naive_greedy(model, prompt, 12)]
    assert len(got[0]) == 12 and len(set(got[0])) > 1


def test_batched_greedy_matches_one_at_a_time(model):
    prompts = prompts_of(5, 17, 1, 9)
    batched = generate(model, prompts, 10)
    assert batched == [generate(model, [p], 10)[0] for p in prompts]
    assert batched == [naive_greedy(model, p, 10) for p in prompts]
    assert generate(model, prompts, 10, batch_size=3) == batched


def test_sampling_is_independent_of_batching(model):
    prompts = prompts_of(5, 17, 1, 9)
    together = generate(model, prompts, 10, **SAMPLING)
    assert generate(model, prompts, 10, batch_size=1, **SAMPLING) == together
    assert generate(model, prompts, 10, batch_size=2, **SAMPLING) == together
    assert generate(model, prompts[:1], 10, **SAMPLING) == together[:1]  # same index: same seed
    assert together != generate(model, prompts, 10, **{**SAMPLING, "seed": 8})
    assert together != generate(model, prompts, 10)  # not greedy


@pytest.mark.parametrize("options", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.5)])
def test_full_vocabulary_sampling_is_independent_of_batching(model, options):
    prompts = prompts_of(3, 12)
    together = generate(model, prompts, 4, seed=1, **options)
    assert generate(model, prompts, 4, seed=1, batch_size=1, **options) == together


def test_seed_unset_follows_torch_global_rng(model):
    prompt = prompts_of(4)
    torch.manual_seed(5)
    first = generate(model, prompt, 8, temperature=1.0)
    torch.manual_seed(5)
    assert generate(model, prompt, 8, temperature=1.0) == first


def test_eos_stops_a_row_only(model):
    prompts = prompts_of(6, 11)
    free = generate(model, prompts, 8)
    k = next(i for i in range(1, 8) if free[0][i] not in free[0][:i])  # a token new at step k
    eos = free[0][k]
    got = generate(model, prompts, 8, eos_id=eos)
    assert got[0] == free[0][:k]
    assert got[1] == naive_greedy(model, prompts[1], 8, eos_id=eos)
    assert generate(model, prompts[:1], 8, eos_id=free[0][0]) == [[]]


def test_context_overflow_crops_like_the_book(model):
    prompts = prompts_of(60, 20, 70)
    got = generate(model, prompts, 20)
    assert [len(t) for t in got] == [20, 20, 20]
    assert got == [naive_greedy(model, p, 20) for p in prompts]
    assert generate(model, prompts, 20, **SAMPLING) == generate(model, prompts, 20, batch_size=1, **SAMPLING)


def test_eval_mode_during_generation_and_restored(tiny_config):
    cfg = GPTConfig(**{**tiny_config.to_dict(), "drop_rate": 0.5})
    model = GPT(cfg).train()
    prompt = prompts_of(5)[0]
    got = generate(model, [prompt], 6)
    assert model.training
    assert got == [naive_greedy(model.eval(), prompt, 6)]


def test_argument_checks(model):
    assert generate(model, [[1, 2]], 0) == [[]]
    assert generate(model, [], 5) == []
    with pytest.raises(GPTFTError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(GPTFTError, match="top_p must be in"):
        generate(model, [[1]], 3, temperature=1.0, top_p=1.5)
    with pytest.raises(GPTFTError, match="temperature must be >= 0"):
        generate(model, [[1]], 3, temperature=-1)


def test_top_k_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    values, ids = top_k_logits(logits, 2)
    assert values.tolist() == [[3.0, 2.0], [5.0, 4.0]] and ids.tolist() == [[1, 2], [2, 3]]
    assert top_k_logits(logits, 10)[0].shape == (2, 4)


def test_top_k_samples_among_the_k_most_likely(model):
    prompt = prompts_of(6)
    logits = model(torch.tensor(prompt))[0, -1]
    allowed = set(torch.topk(logits, 3).indices.tolist())
    drawn = {generate(model, prompt, 1, temperature=5.0, top_k=3, seed=s)[0][0] for s in range(12)}
    assert drawn <= allowed and len(drawn) > 1


def test_top_p_filter():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()[None]
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()
    assert kept(0.01) == [False, True, False, False]  # always the most likely token
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.6) == [False, True, False, True]
    assert kept(0.9) == [True, True, False, True]
    assert kept(1.0) == [True, True, True, True]
    filtered = top_p_filter(logits, 0.6)
    assert math.isclose(torch.softmax(filtered, -1)[0, 1].item(), 0.5 / 0.8, rel_tol=1e-5)


def test_generate_reports_its_speed(model):
    stats = {}
    out = generate(model, prompts_of(5, 9), 6, stats=stats)
    assert stats["prompts"] == 2 and stats["new_tokens"] == sum(map(len, out)) == 12
    assert stats["seconds"] > 0 and stats["tokens_per_s"] == pytest.approx(12 / stats["seconds"])
    generate(model, [], 6, stats=stats)
    assert stats["new_tokens"] == 0 and stats["prompts"] == 0


def test_generate_texts_decodes_and_batches(model):
    from gptft import Tokenizer

    tok = Tokenizer("gpt2")
    prompts = ["Every effort moves you", "Hello", "A much longer prompt than the others here"]
    cfg = GenerateConfig(max_new_tokens=6, batch_size=2)
    texts = generate_texts(model, tok, prompts, cfg)
    tokens = generate(model, tok.encode_batch(prompts), 6, eos_id=tok.eot_id)
    assert texts == [tok.decode(t).strip() for t in tokens]



# ---- the decoding machinery ----------------------------------------------------------------------

@pytest.mark.parametrize("pad_vocab_multiple", [1, 64])
def test_greedy_head_equals_argmax_of_the_logits(tiny_config, pad_vocab_multiple):
    from gptft.generate import _Greedy

    cfg = GPTConfig(**{**tiny_config.to_dict(), "pad_vocab_multiple": pad_vocab_multiple})
    model = GPT(cfg).eval()
    head = _Greedy(model)
    with torch.no_grad():
        for rows in (1, 5, 32):
            hidden = torch.randn(rows, cfg.emb_dim)
            assert head.fused(hidden)
            assert torch.equal(head(hidden), model.logits(hidden).argmax(-1))
        # exact ties go to the lowest token id, within a run, across runs and across chunks
        w = model.lm_head.weight
        hidden = torch.randn(4, cfg.emb_dim)
        for scale, copies in enumerate(([101, 100], [50256, 19743, 130], [16384, 16383, 4096]), 1):
            for j in copies:  # the winner of row 0, several times over, louder than the last one
                w[j] = hidden[0] * 10 * scale
            assert torch.equal(head(hidden), model.logits(hidden).argmax(-1))
            assert head(hidden)[0].item() == min(copies)


def test_greedy_head_falls_back_to_the_plain_projection(tiny_config):
    from gptft.generate import _Greedy

    model = GPT(tiny_config).eval()
    hidden = torch.randn(3, tiny_config.emb_dim)
    assert not _Greedy(model).fused(hidden.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _Greedy(model).fused(hidden)


def test_last_hidden_state_equals_hidden_states(model):
    ids = torch.randint(0, 50257, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :8] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            torch.testing.assert_close(model.last_hidden_state(ids, **kwargs),
                                       model.hidden_states(ids, **kwargs)[:, -1], atol=1e-5, rtol=1e-5)
        cache = KVCache(3, 12)
        last = model.last_hidden_state(ids, attention_mask=mask, kv_cache=cache)
        assert cache.length == 9
        step = model.last_hidden_state(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], 1),
                                       kv_cache=cache)
        full = model.hidden_states(torch.cat([ids, ids[:, :1]], 1),
                                   attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], 1))
    torch.testing.assert_close(last, full[:, -2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, full[:, -1], atol=1e-5, rtol=1e-5)


def test_kv_cache_keep_drops_rows(model):
    ids = torch.randint(0, 50257, (4, 6))
    with torch.no_grad():
        cache = KVCache(4, 8)
        model.hidden_states(ids[:, :5], kv_cache=cache)
        cache.keep(torch.tensor([3, 1]))
        assert cache.batch_size == 2 and cache.length == 5 and cache.k[0].shape[0] == 2
        step = model.hidden_states(ids[[3, 1], 5:], kv_cache=cache)
        full = model.hidden_states(ids[[3, 1]])
    torch.testing.assert_close(step[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def test_finished_rows_are_dropped_without_changing_the_results(model):
    prompts = prompts_of(5, 17, 1, 9, 3, 12, 7, 2)
    free = generate(model, prompts, 10)
    counts = {}
    for row in free:
        for t in set(row[:6]):
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=counts.get)  # a token that ends several rows early
    got = generate(model, prompts, 10, eos_id=eos)
    assert sum(len(t) < 10 for t in got) >= 2
    assert got == [naive_greedy(model, p, 10, eos_id=eos) for p in prompts]
    assert got == [generate(model, [p], 10, eos_id=eos)[0] for p in prompts]
    sampling = {**SAMPLING, "temperature": 0.3}
    sampled = generate(model, prompts, 10, eos_id=eos, **sampling)
    assert sampled == generate(model, prompts, 10, eos_id=eos, batch_size=1, **sampling)


def test_a_shared_prompt_prefix_is_computed_once(model, monkeypatch):
    preamble = prompts_of(12)[0]
    prompts = [preamble + rest for rest in prompts_of(3, 9, 1, 6)] + [preamble[:5] + [7, 8]]
    expected = [naive_greedy(model, p, 8) for p in prompts]
    shared = []
    original = KVCache.share_prefix
    monkeypatch.setattr(KVCache, "share_prefix", lambda self, prefix, starts: (
        shared.append(prefix.length), original(self, prefix, starts))[1])
    assert generate(model, prompts[:4], 8) == expected[:4]
    assert generate(model, prompts, 8) == expected  # the shared prefix is shorter: 5 tokens
    assert shared == [12, 5]
    assert generate(model, prompts, 8, **SAMPLING) == generate(model, prompts, 8, batch_size=1, **SAMPLING)
    assert shared == [12, 5, 5]


@pytest.mark.slow
def test_generation_is_faster_than_transformers():
    """gptft's batched greedy decoding against transformers' generate(): the same random GPT-2-shaped
    model (4 layers, width 256, vocabulary 50,257, fp32), the same 32 real prompts in one
    left-padded batch, 64 new tokens each; interleaved passes, medians (benchmarks/generate_bench.py)."""
    pytest.importorskip("transformers")
    from conftest import shared_path

    data = shared_path("data", "instruction-data.json")
    bench = load_generate_bench()
    out = bench.main(["--data", str(data), "--prompts", "32", "--batch-size", "32",
                      "--max-new-tokens", "64", "--repeats", "3"])
    assert out["identical"], out["first_differences"]
    # The target is 1.5x on an idle machine; other work on the two cores squeezes both sides
    # unevenly (1.40x was seen at load average 3), so a busy machine is held to less.
    busy = os.getloadavg()[0] >= 1.0
    assert out["ratio"] >= (1.2 if busy else 1.5), out


def load_generate_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_bench.py"
    spec = importlib.util.spec_from_file_location("generate_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- command line ------------------------------------------------------------------------------

def make_run(path, tiny_config, task="instruction"):
    meta = {"task": task, "model": tiny_config.to_dict(), "tokenizer": "gpt2", "prompt_style": "alpaca"}
    save_model(path, GPT(tiny_config), meta)
    return path


def test_cli_generate(tmp_path, tiny_config, model, capsys):
    instruction = pytest.importorskip("gptft.prompts")
    from gptft import Tokenizer

    run = tmp_path / "run"
    save_model(run, model, {"task": "instruction", "model": tiny_config.to_dict(), "tokenizer": "gpt2",
                            "prompt_style": "alpaca"})
    assert main(["generate", str(run), "--instruction", "Say hi", "--max-new-tokens", "5"]) == 0
    prompt = instruction.format_prompt({"instruction": "Say hi", "input": ""}, "alpaca")
    expected = generate_texts(model, Tokenizer("gpt2"), [prompt], GenerateConfig(max_new_tokens=5))[0]
    assert expected and capsys.readouterr().out == expected + "\n"
    args = ["generate", str(run), "--instruction", "Say hi", "--input", "Bob", "--max-new-tokens", "5",
            "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9", "--seed", "1"]
    assert main(args) == 0


@pytest.mark.parametrize("case", ["classification", "missing", "bad-top-p"])
def test_cli_generate_errors(tmp_path, tiny_config, capsys, case):
    run = tmp_path / "run"
    extra = []
    if case == "classification":
        make_run(run, tiny_config, task="classification")
    elif case == "bad-top-p":
        extra = ["--temperature", "1", "--top-p", "2"]
    assert main(["generate", str(run), "--instruction", "Say hi", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptft generate: error:") and err.count("\n") == 1
    assert {"classification": "not an instruction or preference run", "missing": "run folder not found",
            "bad-top-p": "--top-p: must be in (0, 1]"}[case] in err
