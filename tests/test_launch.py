"""`tpserve launch --tp 4` on the embedded demo model as a real subprocess, driven over HTTP.

Ray + ZMQ + HTTP end to end; then SIGTERM must stop the server, the ranks and the private Ray
cluster it started, leaving no process behind.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import tpserve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live descendant of pid, from /proc (zombies excluded)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(demo_checkpoint, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("launch") / "launch.log"
    env = {**os.environ, "TPSERVE_CACHE": str(demo_checkpoint.parent), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tpserve.cli", "launch", "--tp", "4",
                                 "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"tpserve launch exited early:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"tpserve launch did not come up:\n{log.read_text()[-3000:]}")
    yield proc, base, log
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def test_completion_over_http_matches_the_in_process_model(server, demo_checkpoint):
    proc, base, log = server
    assert "embedded demo model" in log.read_text()
    # the loaded model is out of the garbage collector's passes before requests are parsed
    assert re.search(r"froze \d+ objects of the startup heap", log.read_text())
    models = httpx.get(f"{base}/v1/models").json()["data"]
    name = models[0]["id"]
    assert name == "tpserve-demo-llama-gptq4"  # the id the README gives
    from tpserve.serve.text import TextCodec
    codec = TextCodec.load(demo_checkpoint)
    ref = tpserve.load(demo_checkpoint, tp=1, dtype=torch.float32)
    prompt = "The quick brown fox"
    want = codec.decode(ref.generate(codec.encode(prompt), max_tokens=12, ignore_eos=True))
    body = {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
    # streaming gives the same text, chunk by chunk
    text, done = "", False
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True},
                      timeout=60) as s:
        for line in s.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert done and text == want
    chat = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    metrics = httpx.get(f"{base}/metrics").text
    assert "tpserve_generation_tokens_total" in metrics


def test_bench_serve_drives_the_server(server):
    """bench/serve.py: concurrent streaming clients, a fixed number of requests, --json."""
    proc, base, log = server
    bench = Path(__file__).parent.parent / "bench" / "serve.py"
    out = subprocess.run([sys.executable, str(bench), "--url", base, "--num-requests", "6",
                          "--concurrency", "3", "--prompt-len", "12", "--output-len", "5",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr + out.stdout
    res = json.loads(out.stdout)
    assert (res["completed"], res["failed"], res["output_tokens"]) == (6, 0, 30)
    assert res["output_token_throughput"] > 0
    for name in ("ttft", "itl", "e2e"):
        p = res[name]
        assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"], (name, p)
    assert res["ttft"]["p50_ms"] <= res["e2e"]["p50_ms"]


def test_sigterm_stops_server_ranks_and_ray(server):
    proc, base, log = server
    family = descendants(proc.pid)
    assert len(family) >= 5, "expected Ray's processes and 4 rank actors under tpserve launch"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(p) for p in family):
        time.sleep(0.5)
    left = [p for p in family if alive(p)]
    assert not left, f"processes left behind: {left}"


# ---- flags: checked before Ray or the model starts ------------------------------------------
from tpserve.cli import _stdout_for_the_result, main  # noqa: E402


@pytest.mark.parametrize("argv,sentence", [
    (["--tp", "0"], "tp=0 is invalid; use a positive integer"),
    (["-tp", "-1"], "tp=-1 is invalid; use a positive integer"),
    (["--tensor-parallel-size", "16"], "num_attention_heads=8 is not divisible by tp=16"),
    (["--device", "cuda"], "device='cuda' was asked for but this machine has no usable CUDA"),
    (["--max-num-seqs", "0"], "num_slots (--max-num-seqs)=0 is invalid"),
    (["--decode-steps", "65"], "decode_steps=65 must be an integer in [1, 64] (--decode-steps)"),
    (["--max-prefill-tokens", "0"], "--max-prefill-tokens 0 must be at least 1"),
    (["--api-key", "sekret "], "the API key (--api-key or TPSERVE_API_KEY) starts or ends with "
                               "white space"),
])
def test_bad_flags_fail_in_one_sentence_before_ray(demo_checkpoint, argv, sentence):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # A process of its own: this session's Ray cluster must not hide a Ray start.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tpserve.cli", "serve", str(demo_checkpoint),
                        "--port", str(free_port()), *argv], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and time.monotonic() - t0 < 20, r.stderr
    out = r.stdout + r.stderr
    assert "Ray instance" not in out, out  # ray.init never ran
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and sentence in errors[0], out


def test_port_in_use_is_found_before_loading(demo_checkpoint, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["launch", "--model", str(demo_checkpoint), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    assert "loaded" not in caplog.text  # nothing was loaded


def test_help_shows_defaults_and_unknown_flags_name_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["launch", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "KV slots = concurrent sequences (default: 8)" in out
    assert "--tensor-parallel-size" in out and "(default: 127.0.0.1)" in out
    with pytest.raises(SystemExit) as e:
        main(["serve", "/m", "--max-batch", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: tpserve serve")
    assert "tpserve serve: error: unrecognized arguments: --max-batch 4" in err


def test_json_mode_keeps_stdout_for_the_result(capfd):
    from types import SimpleNamespace
    args = SimpleNamespace(json=True)
    with _stdout_for_the_result(args):
        os.system("echo '(raylet) a child process writes to fd 1'")
        print("a print to sys.stdout")
        print('{"passed": true}', file=args.stdout)
    out, err = capfd.readouterr()
    assert out == '{"passed": true}\n'
    assert "(raylet) a child" in err and "a print to sys.stdout" in err


def test_submit_waits_while_the_heads_job_agent_starts(caplog):
    """Ray's answer right after `ray start --head` is retried; any other error is not. (A real
    head answers this only for a few seconds after it starts, too briefly to test against.)"""
    from tpserve.submit import submit_when_ready

    class Head:
        def __init__(self, error, fails):
            self.error, self.fails, self.calls = error, fails, 0

        def submit_job(self, **job):
            self.calls += 1
            if self.calls <= self.fails:
                raise RuntimeError(self.error)
            return f"raysubmit_{job['entrypoint']}"
    starting = ("Request failed with status code 503: No available agent to submit job, please "
                "try again later.")
    head = Head(starting, 2)
    assert submit_when_ready(head, poll_s=0.01, entrypoint="x") == "raysubmit_x"
    assert head.calls == 3 and "job agent is still starting" in caplog.text
    with pytest.raises(RuntimeError, match="No available agent"):
        submit_when_ready(Head(starting, 10**6), wait_s=0.05, poll_s=0.01, entrypoint="x")
    other = Head("runtime_env is invalid", 1)
    with pytest.raises(RuntimeError, match="runtime_env"):
        submit_when_ready(other, poll_s=0.01, entrypoint="x")
    assert other.calls == 1
