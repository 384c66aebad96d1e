"""`tpserve submit`: run a tpserve command as a Ray Job, stream its logs, exit with its status.

    tpserve submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml \\
        -- launch --tp 4 --model /models/llama-gptq --host 0.0.0.0

is Ray's `ray job submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml --
tpserve launch ...` with tpserve's defaults: it exits 0 when the job SUCCEEDED and 1 otherwise,
and says in one sentence what to do when the job server cannot be reached. The job's driver runs
the coordinator and the model's head (embedding, lm_head); with `--device cuda` give it a GPU
with `--entrypoint-num-gpus 1`. See cluster/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from tpserve.errors import TpserveError

log = logging.getLogger(__name__)
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
SUBCOMMANDS = ("launch", "serve", "generate", "verify")
AGENT_STARTING = "No available agent to submit job"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the Ray job server, i.e. the head's dashboard (default: "
                                     f"RAY_API_SERVER_ADDRESS, else {DEFAULT_ADDRESS})")
    p.add_argument("--runtime-env", help="runtime env YAML: working_dir, env_vars, ... "
                                         "(e.g. cluster/runtime_env.yaml)")
    p.add_argument("--entrypoint-num-cpus", type=float, default=0,
                   help="CPUs reserved for the job's driver (the coordinator)")
    p.add_argument("--entrypoint-num-gpus", type=float, default=0,
                   help="GPUs reserved for the driver: 1 with --device cuda, whose coordinator "
                        "runs the embedding and lm_head on a GPU")
    p.add_argument("--entrypoint-resources", help='custom resources for the driver as JSON, '
                                                  'e.g. \'{"tpserve_driver": 1}\' to pin it to '
                                                  'the node that exposes the HTTP port')
    p.add_argument("--submission-id", help="job id (default: chosen by Ray)")
    p.add_argument("--no-wait", action="store_true",
                   help="return after submitting instead of streaming the logs")
    p.add_argument("--log-level", default="info")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="after --: the tpserve command to run, e.g. launch --tp 4 --model PATH")


def entrypoint(command: list[str]) -> str:
    """`tpserve ARGS` as one shell line; a leading `--` or `tpserve` is dropped."""
    args = list(command)
    if args[:1] == ["--"]:
        args = args[1:]
    if args[:1] == ["tpserve"]:
        args = args[1:]
    if not args or args[0] not in SUBCOMMANDS:
        raise TpserveError(f"nothing to submit: put a tpserve command ({', '.join(SUBCOMMANDS)}) "
                           f"after --, e.g. `tpserve submit -- launch --tp 4 --host 0.0.0.0`")
    return shlex.join(["tpserve", *args])


def auth_headers() -> dict[str, str]:
    """The cluster token as an HTTP header, found where `ray start` finds it.

    `ray start --head` turns token auth on whenever a token exists (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), but Ray's job client sends it only under
    RAY_AUTH_MODE=token; with RAY_AUTH_MODE set, Ray's own client handles it.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str):
    if importlib.util.find_spec("aiohttp") is None:
        raise TpserveError("tpserve submit needs Ray's job client from ray[default]; "
                           "pip install 'ray[default]==2.60.0'")
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except ConnectionError:
        raise TpserveError(f"no Ray job server answers at {address}; start a head with "
                           f"`ray start --head --dashboard-port 8265` or pass --address "
                           f"http://HEAD:8265") from None
    except AuthenticationError:
        raise TpserveError(f"the Ray cluster at {address} refused this client's token; export "
                           f"the head's token as RAY_AUTH_TOKEN (`ray get-auth-token` on the "
                           f"head)") from None


def load_runtime_env(path: str | None) -> dict | None:
    if path is None:
        return None
    import yaml
    try:
        env = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TpserveError(f"--runtime-env {path} cannot be read as YAML: {e}") from None
    if not isinstance(env, dict):
        raise TpserveError(f"--runtime-env {path} must hold a YAML mapping (working_dir, "
                           f"env_vars, ...), not {type(env).__name__}")
    return env


async def _stream(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def wait_terminal(client, job_id: str, timeout_s: float = 30.0):
    """The job's status once terminal; the log stream can close a moment before that."""
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.2)
        status = client.get_job_status(job_id)
    return status


def submit_when_ready(client, wait_s: float = 60.0, poll_s: float = 1.0, **job) -> str:
    """`client.submit_job(**job)`, retried while the head's job agent is still starting: right
    after `ray start --head` Ray answers "No available agent to submit job" for a few seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except Exception as e:
            if AGENT_STARTING not in str(e) or time.monotonic() > deadline:
                raise
        log.warning("the Ray head's job agent is still starting; retrying in %.0f s", poll_s)
        time.sleep(poll_s)


def run(args) -> int:
    line = entrypoint(args.command)
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    resources = json.loads(args.entrypoint_resources) if args.entrypoint_resources else None
    runtime_env = load_runtime_env(args.runtime_env)
    words = shlex.split(line)
    if words[1] == "launch" and "--host" not in words:
        log.warning("launch binds 127.0.0.1 by default; add --host 0.0.0.0 to reach the server "
                    "from outside the node its driver runs on")
    if "cuda" in words and args.entrypoint_num_gpus == 0:
        log.warning("--device cuda runs the coordinator's embedding and lm_head on a GPU: give "
                    "the driver one with --entrypoint-num-gpus 1")
    client = connect(address)
    job_id = submit_when_ready(client, entrypoint=line, runtime_env=runtime_env,
                               submission_id=args.submission_id,
                               entrypoint_num_cpus=args.entrypoint_num_cpus or None,
                               entrypoint_num_gpus=args.entrypoint_num_gpus or None,
                               entrypoint_resources=resources)
    log.info("submitted job %s to %s: %s", job_id, address, line)
    if args.no_wait:
        print(f"job {job_id} submitted; follow it with `ray job logs --address {address} -f "
              f"{job_id}`, stop it with `ray job stop --address {address} {job_id}`")
        return 0
    try:
        asyncio.run(_stream(client, job_id))
    except KeyboardInterrupt:
        print(f"\ndetached; job {job_id} keeps running: stop it with `ray job stop --address "
              f"{address} {job_id}`", file=sys.stderr)
        return 130
    status = wait_terminal(client, job_id)
    info = client.get_job_info(job_id)
    print(f"job {job_id} {status.value}" + (f": {info.message}" if info.message else ""),
          file=sys.stderr)
    return 0 if status.value == "SUCCEEDED" else 1
