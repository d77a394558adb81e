import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import gptft.io
from gptft.cli import main
from gptft.errors import GPTFTError
from gptft.judge import format_input, judge_file, judge_prompt, parse_score

KEY = "sk-test-0123456789-SECRET"
FAST = ["--retry-delay", "0.001", "--timeout", "5"]

RECORDS = [
    {"instruction": "Rewrite the sentence.", "input": "The cat sat.", "output": "A cat sat.",
     "model_response": "good"},
    {"instruction": "Name a primary color.", "input": "", "output": "Red.", "model_response": "great"},
    {"instruction": "Say nothing.", "input": "", "output": "", "model_response": "  "},
    {"instruction": "Spell 'cat'.", "input": "", "output": "C-A-T", "model_response": "meh"},
]
REPLIES = {"good": "85", "great": "Score: 100\n", "meh": "I would say it is fine", "bad": "12",
           "slow": "50", "huge": "9" * 5000}


class Handler(BaseHTTPRequestHandler):
    """Ollama's /api/chat (JSON lines) and OpenAI's /v1/chat/completions, scripted by the test."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if server.redirect:
            self.send_response(302)
            self.send_header("Location", server.redirect + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        status = server.statuses.pop(0) if server.statuses else 200
        response = body["messages"][0]["content"].split("score the model response `")[1].split("`")[0]
        if response == "leak":  # an error that echoes the credentials, as some servers do
            status = 401
        if response == "slow":
            time.sleep(0.5)
        if response == "hang":  # a server that accepts the request and never answers
            time.sleep(30)
            return None
        if response == "hugejson":  # a JSON reply holding a 5,000-digit integer
            return self._send(200, b'{"seed": ' + b"7" * 5000 + b"}\n")
        if response == "trickle":  # one byte every 50 ms, each well within the socket timeout
            return self._trickle()
        if status != 200:
            padding = "." * 150 if response == "leak" else ""  # a long message, cut by the client
            echo = self.headers.get("Authorization")
            detail = {"error": f"status {status}; {padding}got Authorization: {echo}"}
            return self._send(status, json.dumps(detail).encode())
        reply = REPLIES[response]
        if self.path == "/api/chat":
            lines = [{"model": body["model"], "message": {"role": "assistant", "content": c}, "done": False}
                     for c in reply]
            lines.append({"model": body["model"], "message": {"role": "assistant", "content": ""},
                          "done": True})
            return self._send(200, b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        if self.path == "/v1/chat/completions":
            answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}
            return self._send(200, json.dumps(answer).encode())
        return self._send(404, b'{"error": "not found"}')

    def _send(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # what urllib turns a redirected POST into: recorded, then refused
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": None})
        self._send(404, b'{"error": "not found"}')

    def _trickle(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        try:
            for _ in range(200):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:  # the client hung up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Talk to 127.0.0.1 directly even where a proxy is configured."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def server():
    yield from _serve()


@pytest.fixture
def other_server():
    """A second server on another port: another origin."""
    yield from _serve()


def _serve():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.requests, httpd.statuses, httpd.redirect = [], [], None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def responses(tmp_path):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(RECORDS, indent=1), encoding="utf-8")
    return path


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_format_input_and_prompt_are_the_books():
    assert format_input(RECORDS[1]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nName a primary color.")
    assert format_input(RECORDS[0]).endswith(
        "### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cat sat.")
    assert judge_prompt(RECORDS[0]) == (
        f"Given the input `{format_input(RECORDS[0])}` and correct output `A cat sat.`, score the model "
        "response `good` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only.")


@pytest.mark.parametrize("reply, score", [
    ("85", 85), ("85\n", 85), (" Score: 85", 85), ("0", 0), ("100.", 100), ("I give it 7", 7),
    ("101", None), ("-5", None), ("85.5", None), ("85/100", None), ("great", None), ("", None),
    ("9" * 5000, None), ("0085", 85),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_ollama_scores_are_written_back(server, responses, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # not sent to Ollama
    assert main(["judge", str(responses), "--url", server.url + "/", "--model", "llama3", *FAST]) == 1
    out, err = capsys.readouterr()
    assert out == ("Number of scores: 3 of 4 (2 by the judge; 1 empty response scored 0 without "
                   "asking it)\nAverage score: 61.67 (over the 3 scored records)\n")
    assert err.splitlines() == ["record 3: reply is not an integer score: 'I would say it is fine'",
                                "gptft judge: 1 of 4 records not scored (problems above; a record keeps "
                                "the score of an earlier run, if any); run again to retry them"]
    scored = json.loads(responses.read_text())
    assert [r["score"] for r in scored] == [85, 100, 0, None]
    assert [{k: v for k, v in r.items() if k != "score"} for r in scored] == RECORDS
    assert len(server.requests) == 3  # the empty response was not sent
    request = server.requests[0]
    assert request["path"] == "/api/chat" and "Authorization" not in request["headers"]
    assert request["body"] == {
        "model": "llama3", "messages": [{"role": "user", "content": judge_prompt(RECORDS[0])}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }


def test_openai_api_sends_the_key_and_never_shows_it(server, responses, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    records = RECORDS[:2] + [{**RECORDS[3], "model_response": "leak"}]
    responses.write_text(json.dumps(records), encoding="utf-8")
    before = responses.read_bytes()
    out_file = tmp_path / "scored.json"
    args = ["judge", str(responses), "--url", server.url, "--model", "gpt-4o", "--api", "openai",
            "--api-key-env", "JUDGE_KEY", "--output", str(out_file), *FAST]
    assert main(args) == 1  # one record not scored
    out, err = capsys.readouterr()
    assert "Number of scores: 2 of 3\nAverage score: 92.50 (over the 2 scored records)" in out
    assert "record 2: HTTP 401" in err and "Authorization: Bearer ***" in err
    assert KEY not in out + err + out_file.read_text()
    assert responses.read_bytes() == before
    assert [r["score"] for r in json.loads(out_file.read_text())] == [85, 100, None]
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert request["body"] == {"model": "gpt-4o", "messages": [{"role": "user",
                                                                "content": judge_prompt(RECORDS[0])}],
                               "temperature": 0, "seed": 123}
    assert len(server.requests) == 3  # a 401 is not retried


def test_openai_without_key_sends_no_header(server, responses, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    scores = judge_file(responses, server.url, "m", "openai", retry_delay=0, warn=lambda line: None)
    assert scores == [85, 100, 0, None]
    assert all("Authorization" not in r["headers"] for r in server.requests)


@pytest.mark.parametrize("statuses", [[500], [503, 429]])
def test_server_errors_are_retried(server, responses, statuses):
    server.statuses = list(statuses)
    assert judge_file(responses, server.url, "llama3", retry_delay=0.001) == [85, 100, 0, None]
    assert len(server.requests) == 3 + len(statuses)


def test_persistent_server_error_fails_the_record_only(server, responses):
    server.statuses = [500, 500, 500]
    lines = []
    scores = judge_file(responses, server.url, "llama3", retries=2, retry_delay=0.001, warn=lines.append)
    assert scores == [None, 100, 0, None]
    assert lines[0].startswith("record 0: HTTP 500 from") and "(after 3 attempts)" in lines[0]


def test_client_error_is_not_retried(server, responses):
    server.statuses = [404]
    lines = []
    assert judge_file(responses, server.url, "llama3", retry_delay=0.001, warn=lines.append)[0] is None
    assert len(server.requests) == 3 and lines[0].startswith("record 0: HTTP 404")


def test_timeout_is_retried_then_reported(server, responses):
    responses.write_text(json.dumps([{**RECORDS[0], "model_response": "slow"}, RECORDS[0]]),
                         encoding="utf-8")
    lines = []
    scores = judge_file(responses, server.url, "llama3", timeout=0.1, retries=1, retry_delay=0.001,
                        warn=lines.append)
    assert scores == [None, 85] and len(server.requests) == 3
    assert "no complete reply from" in lines[0] and "(after 2 attempts)" in lines[0]


def test_unreachable_server_is_one_clear_error(responses, capsys):
    before = responses.read_bytes()
    start = time.monotonic()
    url = closed_port_url()
    assert main(["judge", str(responses), "--url", url, "--retries", "2", "--retry-delay", "0.001"]) == 2
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and url in err
    assert "ollama serve" in err and "ollama pull llama3" in err
    assert responses.read_bytes() == before


@pytest.mark.parametrize("content, message", [
    ([{"instruction": "a", "output": "b"}], "record 0: 'model_response' is missing"),
    ([RECORDS[0], {**RECORDS[1], "output": 3}], "record 1: 'output' is not a string"),
    ([RECORDS[0], "text"], "record 1: not a JSON object"),
    ({"records": []}, "expected a JSON array"),
])
def test_bad_records_name_file_and_index(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(GPTFTError, match="bad.json") as e:
        judge_file(path, closed_port_url(), "llama3")
    assert message in str(e.value)


def test_other_response_key(server, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{**RECORDS[0], "model_response": "x", "mine": "bad"}]), encoding="utf-8")
    assert judge_file(path, server.url, "llama3", key="mine") == [12]


def test_failed_write_leaves_the_file_intact(server, responses, monkeypatch):
    before = responses.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(gptft.io.os, "replace", fail)
    with pytest.raises(GPTFTError, match="responses.json: cannot write: disk full; nothing was replaced"):
        judge_file(responses, server.url, "llama3", warn=lambda line: None)
    assert responses.read_bytes() == before
    assert [p.name for p in responses.parent.iterdir()] == [responses.name]  # no temporary file left


# ---- hostile or failing servers -----------------------------------------------------------------

def test_cross_origin_redirect_is_not_followed_and_the_key_not_sent(server, other_server, responses,
                                                                     capsys, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    server.redirect = other_server.url  # 302 to another port: another origin
    before = responses.read_bytes()
    assert main(["judge", str(responses), "--url", server.url, "--api", "openai",
                 "--api-key-env", "JUDGE_KEY", "--retries", "0", *FAST]) == 2
    assert other_server.requests == []  # neither the request nor the key went there
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    err = capsys.readouterr().err
    assert f"redirects (HTTP 302) to {other_server.url}/v1/chat/completions" in err
    assert "the same problem for records 0, 1, 3" in err and KEY not in err
    assert err.strip().splitlines()[-1].startswith("gptft judge: error: the judge scored none of the 3")
    assert responses.read_bytes() == before


def test_trickling_server_is_cut_off_at_the_deadline(server, responses):
    responses.write_text(json.dumps([{**RECORDS[0], "model_response": "trickle"}, RECORDS[1]]))
    lines = []
    start = time.monotonic()
    scores = judge_file(responses, server.url, "llama3", timeout=0.5, retries=1, retry_delay=0.001,
                        warn=lines.append)
    elapsed = time.monotonic() - start
    assert scores == [None, 100]
    assert 1.0 <= elapsed < 3  # two attempts of 0.5 s each; the trickle would last 10 s
    assert lines[0].startswith("record 0: no complete reply from") and "within 0.5 s" in lines[0]
    assert "(after 2 attempts)" in lines[0]


def test_all_failing_server_exits_non_zero_and_keeps_earlier_scores(server, responses, capsys):
    scored = [{**r, "score": 50 + i} for i, r in enumerate(RECORDS)]
    responses.write_text(json.dumps(scored, indent=1))
    before = responses.read_bytes()
    server.statuses = [500] * 3
    assert main(["judge", str(responses), "--url", server.url, "--retries", "0", *FAST]) == 2
    err = capsys.readouterr().err
    assert "record 0: HTTP 500" in err and "the same problem for records 0, 1, 3" in err
    assert "the judge scored none of the 3 responses" in err and "left unchanged" in err
    assert responses.read_bytes() == before


def test_partly_failing_run_keeps_earlier_scores_of_the_failed_records(server, responses, capsys):
    responses.write_text(json.dumps([{**r, "score": 50 + i} for i, r in enumerate(RECORDS)]))
    server.statuses = [500]  # record 0 fails; record 3's reply is not a score
    assert main(["judge", str(responses), "--url", server.url, "--retries", "0", *FAST]) == 1
    out, err = capsys.readouterr()
    assert out == ("Number of scores: 2 of 4 (1 by the judge; 1 empty response scored 0 without "
                   "asking it)\nAverage score: 50.00 (over the 2 scored records)\n")
    assert "2 of 4 records not scored" in err
    assert [r["score"] for r in json.loads(responses.read_text())] == [50, 100, 0, 53]


def test_wrong_key_is_one_problem_not_one_per_record(tmp_path, responses, capsys):
    assert main(["judge", str(responses), "--key", "mine", "--url", closed_port_url()]) == 2
    err = capsys.readouterr().err
    assert err.count("'mine' is missing") == 1 and "records 0, 1, 2, 3: 'mine' is missing" in err


# ---- issue 24: a silent server, empty responses, huge numbers, Ctrl-C, passwords, outputs ---------

def _write(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def test_a_silent_server_stops_after_a_run_of_records_and_keeps_the_scores(server, tmp_path, capsys):
    path = _write(tmp_path / "r.json", [RECORDS[0]] + [{**RECORDS[1], "model_response": "hang"}] * 20)
    start = time.monotonic()
    assert main(["judge", str(path), "--url", server.url, "--timeout", "0.2", "--retries", "1",
                 "--retry-delay", "0.001"]) == 2
    assert time.monotonic() - start < 5  # 3 records x 2 attempts x 0.2 s, not 20 records
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"gptft judge: error: the judge at {server.url} did not answer 3 records "
                           "in a row") and "stopped after 4 of 21 records" in last
    assert f"the 1 scores obtained were written to {path}" in last
    assert [r["score"] for r in json.loads(path.read_text())] == [85] + [None] * 20


def test_a_server_gone_midway_keeps_the_scores(server, tmp_path, capsys, monkeypatch):
    import gptft.judge

    path = _write(tmp_path / "r.json", [RECORDS[0], RECORDS[1]])
    real, calls = gptft.judge.Judge._ask_once, []

    def gone(self, prompt):
        calls.append(1)
        if len(calls) > 1:
            self.url = closed_port_url()
        return real(self, prompt)

    monkeypatch.setattr(gptft.judge.Judge, "_ask_once", gone)
    assert main(["judge", str(path), "--url", server.url, "--retries", "0", *FAST]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot reach the judge" in last and "stopped after 1 of 2 records" in last
    assert [r["score"] for r in json.loads(path.read_text())] == [85, None]


def test_all_empty_responses_are_refused_without_asking(tmp_path, capsys):
    path = _write(tmp_path / "r.json", [{**RECORDS[2]}, {**RECORDS[1], "model_response": ""}])
    before = path.read_bytes()
    assert main(["judge", str(path), "--url", closed_port_url()]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every response ('model_response') is empty" in err
    assert path.read_bytes() == before


@pytest.mark.parametrize("api, response", [("ollama", "huge"), ("openai", "hugejson")])
def test_a_5000_digit_reply_is_a_record_problem(server, tmp_path, capsys, api, response):
    path = _write(tmp_path / "r.json", [{**RECORDS[0], "model_response": response}, RECORDS[0]])
    assert main(["judge", str(path), "--url", server.url, "--api", api, "--retries", "0", *FAST]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "record 0: reply is not" in err and len(err) < 1000
    assert [r["score"] for r in json.loads(path.read_text())] == [None, 85]


def test_ctrl_c_exits_at_once_and_keeps_the_scores(server, tmp_path):
    import signal
    import subprocess
    import sys

    hang = {**RECORDS[3], "model_response": "hang"}
    path = _write(tmp_path / "r.json", [RECORDS[0], RECORDS[1], hang, hang, hang])
    # A terminal's Ctrl-C reaches a process that has SIGINT's default disposition; the test
    # process's own may have been changed by an earlier test, and a child inherits an ignored one.
    proc = subprocess.Popen([sys.executable, "-m", "gptft", "judge", str(path), "--url", server.url,
                             "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any("hang" in json.dumps(r["body"]) for r in server.requests):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert time.monotonic() - start < 3
    assert proc.returncode == 130
    assert err.decode().strip().splitlines() == [
        f"gptft judge: interrupted; stopped after 2 of 5 records: the 2 scores obtained were written to "
        f"{path}; run again to score the rest"]
    assert [r["score"] for r in json.loads(path.read_text())] == [85, 100, None, None, None]


def test_a_password_in_the_url_is_sent_as_basic_auth_and_never_shown(server, tmp_path, capsys):
    import base64

    secret = "PASSW0RD-s3cret"
    path = _write(tmp_path / "r.json", [RECORDS[0], {**RECORDS[1], "model_response": "leak"}])
    url = server.url.replace("http://", f"http://alice:{secret}@")
    assert main(["judge", str(path), "--url", url, "--retries", "0", *FAST]) == 1
    out, err = capsys.readouterr()
    assert secret not in out + err and "record 1: HTTP 401" in err
    assert server.requests[0]["headers"]["Authorization"] == \
        "Basic " + base64.b64encode(f"alice:{secret}".encode()).decode()
    closed = closed_port_url().replace("http://", f"http://alice:{secret}@")
    assert main(["judge", str(path), "--url", closed, "--retries", "0", *FAST]) == 2
    err = capsys.readouterr().err
    assert secret not in err and "alice:***@127.0.0.1" in err and err.count("\n") == 1


def test_output_refuses_an_existing_file_and_links(server, responses, tmp_path, capsys):
    existing = tmp_path / "scored.json"
    existing.write_text("mine\n")
    link = tmp_path / "link.json"
    link.symlink_to(existing)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    for output, words in ((existing, "exists (add --overwrite to replace it)"),
                          (link, "is a symbolic link"), (weights, "name a .json file")):
        assert main(["judge", str(responses), "--url", server.url, "--output", str(output), *FAST]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and str(output) in err
    assert server.requests == [] and existing.read_text() == "mine\n"
    assert weights.read_bytes() == b"weights" and link.is_symlink()
    assert main(["judge", str(responses), "--url", server.url, "--output", str(link), "--overwrite",
                 *FAST]) == 2  # a link even with --overwrite
    assert main(["judge", str(responses), "--url", server.url, "--output", str(existing),
                 "--overwrite", *FAST]) == 1
    assert [r["score"] for r in json.loads(existing.read_text())] == [85, 100, 0, None]


def test_a_linked_responses_file_is_not_replaced_in_place(server, responses, tmp_path, capsys):
    link = tmp_path / "linked.json"
    link.symlink_to(responses)
    before = responses.read_bytes()
    assert main(["judge", str(link), "--url", server.url, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{link}: is a symbolic link" in err and "--output" in err
    assert link.is_symlink() and responses.read_bytes() == before and server.requests == []
