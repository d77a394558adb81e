import math

import pytest
import torch

from gptft import GPT, GPTConfig, GPTFTError
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
    eos = free[0][3]
    assert eos not in free[0][:3]
    got = generate(model, prompts, 8, eos_id=eos)
    assert got[0] == free[0][:3]
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


def test_generate_texts_decodes_and_batches(model):
    from gptft import Tokenizer

    tok = Tokenizer("gpt2")
    prompts = ["Every effort moves you", "Hello", "A much longer prompt than the others here"]
    cfg = GenerateConfig(max_new_tokens=6, batch_size=2)
    texts = generate_texts(model, tok, prompts, cfg)
    tokens = generate(model, tok.encode_batch(prompts), 6, eos_id=tok.eot_id)
    assert texts == [tok.decode(t).strip() for t in tokens]


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
