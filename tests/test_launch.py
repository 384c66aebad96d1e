"""`tpserve launch --tp 4` on the embedded demo model as a real subprocess, driven over HTTP.

Ray + ZMQ + HTTP end to end; then SIGTERM must stop the server, the ranks and the private Ray
cluster it started, leaving no process behind.
"""

import json
import os
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
    models = httpx.get(f"{base}/v1/models").json()["data"]
    name = models[0]["id"]
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
