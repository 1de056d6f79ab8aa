"""generate/serve.py end to end: the real server in a subprocess on a tiny checkpoint, driven by the official
`openai` client. Answers are checked against `litmodel.generate.generate` run in this process (batch 1):
chat (the chat template's exact tokens), completions, streaming, 8 concurrent requests with different
settings, a client that disconnects mid-stream, the 400 / 401 / 429 paths and a SIGTERM shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_chat_checkpoint
from litmodel.checkpoint import load_model
from litmodel.generate import generate
from litmodel.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. Héllo wörld, ça va? 日本語のテキスト. "
        "Once upon a time there was a small model that generated text one token at a time. ") * 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint (context 2048) with a byte-level BPE tokenizer and a ChatML chat template."""
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("serve"), TEXT, CHAT_TEMPLATE, name="tiny-serve",
                                block_size=2048)


@pytest.fixture(scope="module")
def ref(ckpt):
    """The lone greedy/seeded answer of a prompt, computed in this process with `generate` (batch 1)."""
    model = load_model(ckpt, dtype=torch.float32).eval()
    tok = Tokenizer(ckpt)

    def answer(ids, max_tokens, temperature=0.0, seed=None, stop_ids=()):
        with torch.inference_mode():
            return list(generate(model, ids, max_tokens, temperature, None, 1.0, stop_ids, seed=seed,
                                 max_seq_length=2048))

    answer.tok = tok
    return answer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, ckpt: Path, log: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "generate" / "serve.py"), "--checkpoint_dir", str(ckpt), "--port",
             str(self.port), "--precision", "32-true", "--log_level", "warning", *args],
            cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 180
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise AssertionError(f"the server did not start:\n{log.read_text()}")
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def client(self, key: str | None = KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    s = Server(ckpt, tmp_path_factory.mktemp("serve_log") / "server.log", "--max_batch_size", "8", "--max_queue", "0",
               "--api_key", KEY)
    yield s
    s.stop()


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Héllo! How are you?"}]


def test_models_health_and_chat_uses_the_chat_template(server, ckpt, ref):
    assert [m.id for m in server.client().models.list().data] == [str(ckpt)]
    assert server.health()["status"] == "ok"
    tok = ref.tok
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)  # as generate/chat.py does
    r = server.client().chat.completions.create(model="x", messages=MESSAGES, max_tokens=12, temperature=0)
    expected = ref(ids, 12, stop_ids=tok.end_of_turn_ids)
    assert r.choices[0].message.content == tok.decode(expected)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    # max_completion_tokens is the newer name of max_tokens; content parts are joined
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "Héllo! "},
                                                        {"type": "text", "text": "How are you?"}]}]
    r2 = server.client().chat.completions.create(model="x", messages=parts, max_completion_tokens=12, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_completions_and_streaming_equal_the_lone_answer(server, ref):
    tok, client = ref.tok, server.client()
    prompt = "Once upon a time there"
    expected = tok.decode(ref(tok.encode(prompt), 30, stop_ids=tok.stop_ids))
    r = client.completions.create(model="x", prompt=prompt, max_tokens=30, temperature=0)
    assert r.choices[0].text == expected and r.usage.completion_tokens == 30
    chunks = list(client.completions.create(model="x", prompt=prompt, max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # chat streaming: a role chunk, content deltas, a finish chunk, then a usage chunk when asked
    plain = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=20, temperature=0)
    stream = list(client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == plain.choices[0].message.content
    assert stream[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == plain.usage.completion_tokens
    # the raw event stream ends with [DONE]; token-id prompts work too
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": tok.encode(prompt), "max_tokens": 5, "temperature": 0, "stream": True}) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"
    text = "".join(json.loads(ln[6:])["choices"][0]["text"] for ln in lines[:-1])
    assert text == tok.decode(ref(tok.encode(prompt), 5, stop_ids=tok.stop_ids))


def test_eight_concurrent_requests_each_get_their_lone_answer(server, ref):
    """Different prompt lengths, budgets, stop strings, seeded sampling, chat and completions, all at once."""
    tok, client = ref.tok, server.client()
    words = TEXT.split()
    jobs = []
    for i in range(8):
        prompt = " ".join(words[i: i + 2 + 3 * i])
        kw = dict(max_tokens=40 + 10 * i, temperature=0.0 if i % 2 == 0 else 0.8, seed=1000 + i)
        jobs.append(("chat" if i % 3 == 0 else "completion", prompt, kw))

    def run(job):
        kind, prompt, kw = job
        if kind == "chat":
            r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": prompt}], **kw)
            return r.choices[0].message.content, r.choices[0].finish_reason
        r = client.completions.create(model="x", prompt=prompt, **kw)
        return r.choices[0].text, r.choices[0].finish_reason

    lone = [run(job) for job in jobs]  # one at a time
    # give two of them a stop string taken from their lone answer: the text ends right before it
    for i in (2, 5):
        text = lone[i][0]
        stop = text[len(text) // 2: len(text) // 2 + 3]
        jobs[i][2]["stop"] = [stop, "\x00never"]
        lone[i] = (text[:text.index(stop)], "stop")
    before = server.health()
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, jobs))
    assert together == lone
    assert server.health()["max_active"] >= 2  # they were decoded together, not one after the other
    # and the lone greedy answers are those of `generate` (batch 1)
    for (kind, prompt, kw), (text, _) in zip(jobs, lone):
        if kw["temperature"] == 0 and "stop" not in kw:
            ids = (tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True) if kind == "chat"
                   else tok.encode(prompt))
            stops = tok.end_of_turn_ids if kind == "chat" else tok.stop_ids
            assert text == tok.decode(ref(ids, kw["max_tokens"], stop_ids=stops))
    assert server.health()["finished"] == before["finished"] + 8


def test_disconnect_frees_the_slot_and_a_full_server_answers_429(server):
    client = server.client()
    before = server.health()
    streams = []
    for i in range(8):  # fill every slot (--max_queue 0) with long streams
        s = client.completions.create(model="x", prompt=f"Hello {i}", max_tokens=2000, temperature=0, stream=True)
        next(iter(s))
        streams.append(s)
    assert server.health()["active"] == 8
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model="x", prompt="one too many", max_tokens=5)
    assert err.value.status_code == 429 and err.value.body["type"] == "rate_limit_error"
    for s in streams:
        s.close()  # the client goes away mid-stream
    deadline = time.time() + 30
    while server.health()["active"] and time.time() < deadline:
        time.sleep(0.05)
    after = server.health()
    assert after["active"] == 0 and after["cancelled"] == before["cancelled"] + 8
    assert after["completion_tokens"] - before["completion_tokens"] < 8 * 2000
    r = client.completions.create(model="x", prompt="Hello", max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5


@pytest.mark.parametrize("body, fragment", [
    ('{"prompt": "Hi", "max_tokens": 5', "not valid JSON"),
    ({"prompt": "Hi", "max_tokens": -1}, "max_tokens must be >= 1"),
    ({"prompt": "Hi", "max_tokens": 5000}, "exceed the context of 2048"),
    ({"prompt": [5] * 2100, "max_tokens": 1}, "exceed the context of 2048"),
    ({"prompt": "Hi", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "Hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "Hi", "temperature": -1}, "temperature must be in [0, 2]"),
    ({"prompt": "Hi", "top_p": 0}, "top_p"),
    ({"prompt": "Hi", "n": 2}, "only n=1"),
    ({"prompt": "Hi", "stop": [""]}, "stop strings"),
    ({"prompt": "Hi", "logprobs": 3}, "'logprobs' is not supported"),
    ({"prompt": "Hi", "seed": 2**70}, "seed must fit in 64 bits"),
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": [100000], "max_tokens": 5}, "token ids must be in"),
])
def test_invalid_requests_get_400_with_an_openai_error_body(server, body, fragment):
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}",
                                                            "Content-Type": "application/json"}, timeout=30, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"] == "invalid_request_error"


def test_chat_400_and_api_key_401(server):
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="x", messages=[], max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        server.client().chat.completions.create(model="x", messages=[{"content": "no role"}], max_tokens=5)
    for key in (None, "wrong-key"):
        with pytest.raises(openai.AuthenticationError) as err:
            server.client(key).completions.create(model="x", prompt="Hi", max_tokens=5)
        assert err.value.status_code == 401
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200  # liveness probes need no key


def test_sigterm_finishes_in_flight_work_and_exits_0(ckpt, ref, tmp_path):
    s = Server(ckpt, tmp_path / "server.log", "--shutdown_timeout", "60")
    try:
        tok = ref.tok
        stream = s.client().completions.create(model="x", prompt="Hello", max_tokens=300, temperature=0, stream=True)
        chunks = [next(iter(stream))]
        s.proc.send_signal(signal.SIGTERM)
        chunks += list(stream)  # the answer still arrives in full
        assert "".join(c.choices[0].text for c in chunks) == tok.decode(ref(tok.encode("Hello"), 300,
                                                                            stop_ids=tok.stop_ids))
        assert chunks[-1].choices[0].finish_reason == "length"
        assert s.proc.wait(60) == 0, s.log.read_text()
        assert "stopped by SIGTERM" in s.log.read_text()
    finally:
        s.stop()


def test_base_prompts_file_is_batched_and_equals_lone_answers(ckpt, ref, tmp_path, capsys):
    """generate/base.py --prompts_file: text lines or JSON lines, one JSON line out per prompt, in order."""
    import importlib.util

    from litmodel.cli import cli_main

    spec = importlib.util.spec_from_file_location("_litmodel_generate_base_batch", ROOT / "generate" / "base.py")
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    tok = ref.tok
    prompts = ["Once upon a time", "Héllo", "The quick brown fox jumps over the lazy dog.", "日本語"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts), encoding="utf-8")
    expected = [tok.decode(ref(tok.encode(p), 15, stop_ids=tok.stop_ids)) for p in prompts]
    for name in ("p.txt", "p.jsonl"):
        cli_main(base.setup)(["--checkpoint_dir", str(ckpt), "--prompts_file", str(tmp_path / name),
                              "--max_new_tokens", "15", "--temperature", "0", "--precision", "32-true",
                              "--max_batch_size", "3"])
        out = capsys.readouterr()
        rows = [json.loads(ln) for ln in out.out.splitlines()]
        assert [r["prompt"] for r in rows] == prompts and [r["completion"] for r in rows] == expected
        assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 15 for r in rows)
        assert "4/4 prompts" in out.err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(SystemExit):
        cli_main(base.setup)(["--checkpoint_dir", str(ckpt), "--prompts_file", str(tmp_path / "bad.jsonl")])
    assert 'line 2' in capsys.readouterr().err


def test_help_and_the_missing_extra_error(monkeypatch, capsys):
    import importlib

    from litmodel.utils import LitModelError

    spec = importlib.util.spec_from_file_location("_litmodel_generate_serve", ROOT / "generate" / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    with pytest.raises(SystemExit) as exit_:
        serve.setup(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for flag in ("--checkpoint_dir", "--host", "--port", "--max_batch_size", "--max_seq_length", "--max_queue",
                 "--api_key", "--shutdown_timeout", "--precision", "--compile", "--quantize"):
        assert flag in out
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "litmodel.server", raising=False)
    with pytest.raises(LitModelError, match=r'pip install -e "\.\[serve\]"'):
        importlib.import_module("litmodel.server")
