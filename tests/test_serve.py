"""``gptft serve`` on loopback, called with the official ``openai`` client (and httpx for what the
client hides): the routes, streaming, continuous batching against ``gptft generate``, the error
bodies, cancellation, queue limits, ``gptft judge --url`` and SIGTERM.

The runs are tiny random GPTs written here; what is checked is what the server computes from
them (the same tokens as ``generate``), not what a model learnt."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import ROOT, free_port  # noqa: E402

from gptft.classifier import GPTClassifier, load_classifier  # noqa: E402
from gptft.cli import main  # noqa: E402
from gptft.generate import generate  # noqa: E402
from gptft.model import GPT, GPTConfig  # noqa: E402
from gptft.prompts import format_prompt  # noqa: E402
from gptft.runs import save_model  # noqa: E402
from gptft.serve.app import create_app, load_served  # noqa: E402
from gptft.serve.options import ServeOptions  # noqa: E402
from gptft.tokenizer import Tokenizer  # noqa: E402

CONFIG = GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_layers=2, n_heads=4)
KEY = "sk-test-0123456789"
INSTRUCTIONS = ["Name a color.", "Say hello.", "Translate 'cat' to French.", "What is 2 + 2?",
                "List three fruits.", "Write a haiku about rain.", "Spell 'dog' backwards.",
                "Give a synonym of fast.", "Is water wet?", "Count to five.", "Name a planet.",
                "What day follows Monday?", "Rhyme with 'light'.", "Name an animal.",
                "Define 'serve'.", "Summarise: the cat sat on the mat."]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models decode one row or sixteen faster on one thread than on two that wait for each
    other on a busy machine; the results are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "tiny-instruct"
    torch.manual_seed(2)
    save_model(run, GPT(CONFIG), {"task": "instruction", "model": CONFIG.to_dict(), "tokenizer": "gpt2",
                                  "prompt_style": "alpaca", "max_length": 128})
    return run


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("serve") / "tiny-spam"
    torch.manual_seed(1)
    save_model(run, GPTClassifier(GPT(CONFIG), 2), {"task": "classification", "model": CONFIG.to_dict(),
                                                    "tokenizer": "gpt2", "labels": ["ham", "spam"],
                                                    "max_length": 64})
    return run


class Server:
    """uvicorn serving a run on 127.0.0.1 in a thread of this process."""

    def __init__(self, run, **options):
        options = {"model_name": run.name, "api_key": KEY, **options}
        self.served = load_served(run, "cpu", options.get("max_batch", 16), options.get("max_queue", 256))
        self.options = ServeOptions(**options)
        self.port = free_port()
        config = uvicorn.Config(create_app(self.served, self.options), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.served.engine.alive

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, body, key: str | None = KEY, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if isinstance(body, (dict, list)):
            kwargs["json"] = body
        else:
            kwargs["content"] = body
        kwargs.setdefault("timeout", 60)
        return httpx.post(self.base + path, headers={**headers, **kwargs.pop("headers", {})}, **kwargs)


@pytest.fixture(scope="module")
def lm_server(lm_run):
    with Server(lm_run) as server:
        yield server


@pytest.fixture(scope="module")
def model_and_tokenizer(lm_server):
    return lm_server.served.engine.model, Tokenizer("gpt2")


def expected(model_and_tokenizer, instruction: str, max_tokens: int, **sampling) -> tuple[str, int]:
    """``gptft generate``'s response (text, token count) to one instruction, decoded alone."""
    model, tok = model_and_tokenizer
    prompt = tok.encode(format_prompt({"instruction": instruction}, "alpaca"))
    tokens = generate(model, [prompt], max_tokens, eos_id=tok.eot_id, **sampling)[0]
    return tok.decode(tokens), len(tokens)


def chat(client, instruction: str, **kwargs):
    return client.chat.completions.create(model="tiny-instruct", messages=[
        {"role": "user", "content": instruction}], **kwargs)


# ---- the engine alone ----------------------------------------------------------------------------

@pytest.mark.parametrize("max_batch", [4, 16])
def test_engine_equals_generate_with_joins_leaves_and_reused_slots(max_batch):
    """16 prompts of different lengths submitted at once (prefilled together), with different
    max_tokens (rows leave at different steps, their slots refilled from the queue; the cache
    grows mid-way), greedy and seeded sampling: each equals ``generate`` on its prompt alone."""
    from gptft.serve.engine import GenerationEngine, GenerationRequest

    torch.manual_seed(0)
    model, tok = GPT(CONFIG).eval(), Tokenizer("gpt2")
    engine = GenerationEngine(model, tok, max_batch=max_batch, max_queue=16)
    events: dict[int, list] = {i: [] for i in range(16)}
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(event):
            events[i].append(event)
            if event.done:
                done.release()
        return emit

    prompts = [tok.encode(f"Prompt {i}: " + "word " * (4 * i)) for i in range(16)]  # 4..64 tokens
    sampling = [{} if i % 2 == 0 else dict(temperature=0.8, top_k=40, seed=i) for i in range(16)]
    requests = [GenerationRequest(p, 4 + i, emitter(i), **sampling[i]) for i, p in enumerate(prompts)]
    engine.start()
    try:
        engine.submit(requests)
        for _ in range(16):
            assert done.acquire(timeout=60)
    finally:
        engine.stop(10)
    assert engine.peak == max_batch
    assert engine.cache.capacity == 128  # grown from 64 while decoding (the slots' keys copied)
    for i, p in enumerate(prompts):
        tokens = generate(model, [p], 4 + i, eos_id=tok.eot_id, **sampling[i])[0]
        assert "".join(e.text for e in events[i]) == tok.decode(tokens), i
        assert events[i][-1].completion_tokens == len(tokens) and events[i][-1].finish_reason == "length"


@pytest.mark.slow
def test_classify_engine_labels_waiting_requests_in_one_batch(classifier_run):
    from gptft.serve.engine import ClassifyEngine, ClassifyRequest

    clf = load_classifier(classifier_run)
    calls = []
    predict = clf.predict
    clf.predict = lambda texts, batch_size: calls.append(len(texts)) or predict(texts, batch_size)
    engine = ClassifyEngine(clf, max_batch=5, max_queue=8)
    results: dict[int, list] = {}
    texts = [["spam spam", "ham"], ["call now"], ["see you", "at 7"], ["a", "b", "c", "d"],
             [f"text {j}" for j in range(7)]]
    for i, t in enumerate(texts):  # queued before the engine runs: they wait together
        engine.submit([ClassifyRequest(t, lambda e, i=i: results.__setitem__(i, e.result))])
    engine.start()
    deadline = time.monotonic() + 30
    while len(results) < len(texts):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    engine.stop(10)
    assert calls == [5, 4, 7]  # 2 + 1 + 2 texts; 4 (+ 7 would pass max_batch); 7 alone
    for i, t in enumerate(texts):
        assert [p.label for p in results[i]] == [p.label for p in predict(t)]


# ---- the routes, with the openai client ---------------------------------------------------------

def test_models_and_health(lm_server):
    models = lm_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-instruct"]
    health = httpx.get(f"http://127.0.0.1:{lm_server.port}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_chat_equals_generate(lm_server, model_and_tokenizer, lm_run, capsys):
    reply = chat(lm_server.client(), "Name a color.", temperature=0, max_tokens=24)
    text, n = expected(model_and_tokenizer, "Name a color.", 24)
    assert reply.choices[0].message.content == text and text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == n == 24
    assert reply.model == "tiny-instruct" and reply.object == "chat.completion"
    # the same as the command prints (it strips the response)
    assert main(["generate", str(lm_run), "--instruction", "Name a color.", "--max-new-tokens", "24",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == text.strip() + "\n"


def test_system_message_joins_the_instruction(lm_server, model_and_tokenizer):
    reply = lm_server.client().chat.completions.create(
        model="tiny-instruct", temperature=0, max_tokens=8,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}])
    assert reply.choices[0].message.content == expected(model_and_tokenizer, "Be brief.\n\nSay hello.", 8)[0]


@pytest.mark.slow
def test_sixteen_concurrent_requests_equal_generate_alone(lm_server, model_and_tokenizer):
    """16 requests at once (greedy and seeded sampling, different lengths) are decoded together,
    and each gets the tokens ``generate`` gives its prompt alone."""
    client, engine = lm_server.client(), lm_server.served.engine
    peak = engine.peak
    engine.peak = 0
    kwargs = [dict(temperature=0, max_tokens=20 + i) if i % 2 == 0 else
              dict(temperature=0.9, top_p=0.95, seed=i, max_tokens=20 + i, extra_body={"top_k": 50})
              for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: chat(client, INSTRUCTIONS[i], **kwargs[i]), range(16)))
    assert engine.peak >= 8, f"at most {engine.peak} requests were decoded together"
    engine.peak = max(peak, engine.peak)
    for i, reply in enumerate(replies):
        sampling = ({} if i % 2 == 0 else
                    dict(temperature=0.9, top_k=50, top_p=0.95, seed=i))
        text, n = expected(model_and_tokenizer, INSTRUCTIONS[i], 20 + i, **sampling)
        assert reply.choices[0].message.content == text, i
        assert reply.usage.completion_tokens == n


def test_stream_joins_to_the_non_streamed_text(lm_server):
    client = lm_server.client()
    full = chat(client, "Write a haiku about rain.", temperature=0, max_tokens=30)
    stream = chat(client, "Write a haiku about rain.", temperature=0, max_tokens=30, stream=True,
                  stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len([p for p in pieces if p]) > 1  # it did arrive in pieces


def test_stop_strings_stream_and_not(lm_server):
    client = lm_server.client()
    full = chat(client, "Count to five.", temperature=0, max_tokens=30).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = chat(client, "Count to five.", temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = chat(client, "Count to five.", temperature=0, max_tokens=30, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.index(stop)]


def test_completions(lm_server, model_and_tokenizer):
    model, tok = model_and_tokenizer
    client = lm_server.client()
    prompts = ["Once upon a time", "The capital of France is"]
    reply = client.completions.create(model="tiny-instruct", prompt=prompts, temperature=0, max_tokens=10)
    assert [c.index for c in reply.choices] == [0, 1]
    for choice, prompt in zip(reply.choices, prompts):
        assert choice.text == tok.decode(generate(model, [tok.encode(prompt)], 10, eos_id=tok.eot_id)[0])
    assert reply.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    streamed = client.completions.create(model="tiny-instruct", prompt=prompts[0], temperature=0,
                                         max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_classify(classifier_run):
    texts = ["WINNER!! Call now to claim your prize", "See you at 7, bring the cake"]
    with Server(classifier_run) as server:
        client = server.client()
        reply = client.post("/classify", body={"model": "tiny-spam", "input": texts}, cast_to=httpx.Response)
        body = reply.json()
        assert client.models.list().data[0].id == "tiny-spam"
        wrong = server.post("/chat/completions", {"model": "tiny-spam", "messages": [
            {"role": "user", "content": "hi"}]})
    predictions = load_classifier(classifier_run).predict(texts)
    assert [d["label"] for d in body["data"]] == [p.label for p in predictions]
    for d, p in zip(body["data"], predictions):
        assert d["probabilities"] == pytest.approx(p.probabilities, abs=1e-6)
        assert d["probability"] == pytest.approx(p.probability, abs=1e-6)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model"
    assert "/v1/classify" in wrong.json()["error"]["message"]


# ---- errors ------------------------------------------------------------------------------------

GOOD = {"model": "tiny-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("body, key, status, param, words", ids=lambda v: str(v)[:40], argvalues=[
    (b'{"model": "tiny-instruct", "messages": [', KEY, 400, None, "not valid JSON"),
    (b"[1, 2]", KEY, 400, None, "JSON object"),
    ({**GOOD, "model": "gpt-4o"}, KEY, 404, "model", "'gpt-4o' is not served here"),
    ({k: v for k, v in GOOD.items() if k != "model"}, KEY, 400, "model", "required"),
    (GOOD, "sk-wrong", 401, None, "incorrect API key"),
    (GOOD, None, 401, None, "missing API key"),
    ({**GOOD, "messages": [{"role": "user", "content": "word " * 200}]}, KEY, 400, "messages",
     "context is 128 tokens"),
    ({**GOOD, "max_tokens": 120}, KEY, 400, "max_tokens", "context of 128 tokens"),
    ({**GOOD, "max_tokens": 0}, KEY, 400, "max_tokens", "must be >= 1"),
    ({**GOOD, "max_tokens": -3}, KEY, 400, "max_tokens", "must be >= 1"),
    ({**GOOD, "max_tokens": 1000}, KEY, 400, "max_tokens", "at most 256"),
    ({**GOOD, "max_tokens": "4"}, KEY, 400, "max_tokens", "must be an integer (got a string)"),
    ({k: v for k, v in GOOD.items() if k != "max_tokens"} | {"max_completion_tokens": 0}, KEY, 400,
     "max_completion_tokens", "must be >= 1"),
    ({**GOOD, "temperature": "hot"}, KEY, 400, "temperature", "must be a number"),
    ({**GOOD, "temperature": 3}, KEY, 400, "temperature", "[0, 2]"),
    ({**GOOD, "top_p": 0}, KEY, 400, "top_p", "(0, 1]"),
    ({**GOOD, "seed": 1.5}, KEY, 400, "seed", "integer"),
    ({**GOOD, "stream": "yes"}, KEY, 400, "stream", "true or false"),
    ({**GOOD, "stop": [1]}, KEY, 400, "stop", "stop"),
    ({**GOOD, "messages": "hi"}, KEY, 400, "messages", "non-empty list"),
    ({**GOOD, "messages": [{"role": "robot", "content": "hi"}]}, KEY, 400, "messages[0].role", "robot"),
    ({**GOOD, "messages": [{"role": "user", "content": 5}]}, KEY, 400, "messages[0].content", "string"),
    ({**GOOD, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}]}, KEY, 400, "messages[1].role", "assistant"),
    ({**GOOD, "frequency_penalty": 1}, KEY, 400, "frequency_penalty", "unrecognized"),
    ({**GOOD, "n": 2}, KEY, 400, "n", "only 1"),
    (json.dumps({**GOOD, "pad": "x" * 5000}).encode(), KEY, 413, None, "at most 4,096"),
])
def test_bad_requests_get_openai_error_bodies(lm_run, body, key, status, param, words, lm_small_body):
    reply = lm_small_body.post("/chat/completions", body, key=key)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert "Traceback" not in reply.text


@pytest.fixture(scope="module")
def lm_small_body(lm_run):
    with Server(lm_run, max_body_bytes=4096) as server:
        yield server


def test_openai_client_raises_with_the_body(lm_server):
    with pytest.raises(openai.AuthenticationError) as e:
        chat(lm_server.client("sk-wrong"), "hi", max_tokens=4)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as e:
        chat(lm_server.client(), "hi", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    assert e.value.body["message"] == "max_tokens: must be >= 1 (got 0)"
    with pytest.raises(openai.NotFoundError):
        lm_server.client().completions.create(model="nope", prompt="hi")
    unknown = httpx.get(lm_server.base + "/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"].startswith("unknown request URL")


def test_full_queue_is_429_at_once_and_timeout_is_504(lm_run):
    server = Server(lm_run, max_batch=1, max_queue=1, timeout=0.8)
    server.served.engine.start = lambda: None  # nothing is decoded: the first request waits
    with server:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(server.post, "/chat/completions", GOOD)
            while server.served.engine.waiting() == 0:
                assert not first.done(), first.result().text
                time.sleep(0.01)
            started = time.monotonic()
            second = server.post("/chat/completions", GOOD)
            assert time.monotonic() - started < 0.5
            assert second.status_code == 429 and second.json()["error"]["code"] == "queue_full"
            assert first.result().status_code == 504
            message = first.result().json()["error"]["message"]
            assert message == "the request took longer than 0.8 s (--timeout)"


def _slow_down(engine, seconds: float):
    """Make each forward of the engine's model take `seconds` more (so requests last a while)."""
    inner = engine.model.hidden_states

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return inner(*args, **kwargs)

    engine.model.hidden_states = slow
    return lambda: delattr(engine.model, "hidden_states")


def test_a_client_that_leaves_stops_its_decoding(lm_run):
    with Server(lm_run) as server:
        engine = server.served.engine
        restore = _slow_down(engine, 0.02)
        try:
            stream = chat(server.client(), "Count to five.", temperature=0, max_tokens=80, stream=True)
            next(iter(stream))
            stream.close()  # the client leaves mid-stream
            with pytest.raises(httpx.ReadTimeout):  # leaves before the reply
                server.post("/chat/completions", {**GOOD, "max_tokens": 80}, timeout=0.3)
            deadline = time.monotonic() + 10
            while engine.cancelled < 2 or engine.active():
                assert time.monotonic() < deadline, (engine.cancelled, engine.active())
                time.sleep(0.02)
            assert engine.steps < 120  # neither ran to its 80 tokens
        finally:
            restore()


def test_a_failing_step_is_a_500_without_traceback_and_the_server_goes_on(lm_server):
    engine = lm_server.served.engine
    inner = engine.model.hidden_states

    def broken(*args, **kwargs):
        del engine.model.hidden_states  # fails once
        raise RuntimeError("out of memory (simulated)")

    engine.model.hidden_states = broken
    try:
        reply = lm_server.post("/chat/completions", GOOD)
    finally:
        engine.model.__dict__.pop("hidden_states", None)
    assert reply.status_code == 500 and "Traceback" not in reply.text
    assert reply.json()["error"] == {"message": "generation failed: RuntimeError: out of memory (simulated)",
                                     "type": "server_error", "param": None, "code": None}
    assert engine.model.hidden_states == inner
    assert lm_server.post("/chat/completions", GOOD).status_code == 200


def test_judge_takes_an_openai_base_url():
    from gptft.judge import Judge

    assert Judge("http://h:1/v1/", "m", api="openai").endpoint == "http://h:1/v1/chat/completions"
    assert Judge("http://h:1", "m", api="openai").endpoint == "http://h:1/v1/chat/completions"
    assert Judge("http://h:1", "m").endpoint == "http://h:1/api/chat"


def test_judge_scores_against_serve(tmp_path, monkeypatch):
    """``gptft judge --url http://127.0.0.1:PORT/v1 --model NAME`` against a server whose model
    always answers "85" (its final norm outputs that token's embedding)."""
    config = GPTConfig(vocab_size=50257, context_length=256, emb_dim=32, n_layers=2, n_heads=4)
    run = tmp_path / "judge"
    torch.manual_seed(3)
    model = GPT(config)
    with torch.no_grad():
        token = Tokenizer("gpt2").encode("85")[0]
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(model.wte.weight[token] * 100)
        model.wte.weight[token] *= 3
    save_model(run, model, {"task": "instruction", "model": config.to_dict(), "tokenizer": "gpt2",
                            "prompt_style": "alpaca"})
    responses = tmp_path / "responses.json"
    responses.write_text(json.dumps([{"instruction": "Name a color.", "input": "", "output": "Blue.",
                                      "model_response": "Red."}] * 2))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with Server(run, max_new_tokens=1) as server:
        assert main(["judge", str(responses), "--url", server.base, "--model", "judge", "--retries",
                     "0"]) == 0
    assert [r["score"] for r in json.loads(responses.read_text())] == [85, 85]


# ---- the command -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0", "--timeout", "-1"], "--max-batch: must be > 0 (got 0); --timeout: must be > 0"),
    (["--port", "70000"], "--port: must be in 0..65535 (got 70000)"),
    ([], "run folder not found"),
])
def test_serve_command_errors_are_one_line(lm_run, tmp_path, capsys, args, message):
    run = str(tmp_path / "missing") if not args else str(lm_run)
    assert main(["serve", run, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_serve_command_answers_and_exits_0_on_sigterm(lm_run):
    """``gptft serve`` in its own process: a streamed request in flight when SIGTERM comes is
    finished, then the process exits with status 0; the key is never printed."""
    port = free_port()
    env = dict(os.environ, GPTFT_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "gptft", "serve", str(lm_run), "--port", str(port),
                             "--device", "cpu", "--timeout", "30"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        stream = chat(client, "Count to five.", temperature=0, max_tokens=60, stream=True,
                      stream_options={"include_usage": True})
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)  # most of the 60 tokens are yet to be decoded
        rest = list(stream)
        assert first.choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        assert rest[-1].usage.completion_tokens == 60
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "tiny-instruct" in out and KEY not in out


@pytest.mark.slow
def test_benchmark_script_runs(tmp_path):
    """benchmarks/serve.py end to end at a tiny size: every request not cancelled is answered."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "benchmarks" / "serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--requests", "2", "--rounds", "1", "--clients", "2", "--max-tokens", "8",
                      "--cancel-requests", "12", "--cancel-share", "0.5", "--emb-dim", "32"])
    cancel = out["cancellations"]
    assert cancel["lost"] == 0 and cancel["all_results"] and cancel["answered"] == cancel["kept"] > 0
    assert out["server_alive_after"] and out["server_idle_after"]["decoding"] == 0
    assert out["exit_status_on_sigterm"] == 0
    assert out["sequential"]["tokens"] == out["concurrent"]["tokens"] == 16
