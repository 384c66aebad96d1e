"""The `tpserve` command: launch (OpenAI-compatible server), generate (one shot), verify, submit.

    tpserve launch --tp 4                      # the embedded demo model, private Ray cluster
    tpserve serve /ckpt -tp 2                  # vLLM's spelling of `launch --model /ckpt --tp 2`
    tpserve launch --model /ckpt --tp 2 --address auto --device cuda
    tpserve generate --model /ckpt --tp 2 --prompt "Hello"
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time

from tpserve.options import add_deploy_arguments, check_port, options_from_args
from tpserve.model.rank_head import HEAD_AT
from tpserve.runtime.comm import ALLREDUCE

log = logging.getLogger("tpserve")


def _common(p: argparse.ArgumentParser) -> None:
    add_deploy_arguments(p)
    p.add_argument("--placement", choices=["strict_pack", "pack", "spread"], default="strict_pack",
                   help="strict_pack: all ranks on one node; pack: spill over nodes")
    p.add_argument("--max-model-len", type=int, help="context length (default: the config's)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="KV slots = concurrent sequences")
    p.add_argument("--allreduce", choices=ALLREDUCE, default="auto",
                   help="all-reduce data path of Ray ranks (auto: shm for CPU ranks on the driver's "
                        "host, cuda (one-shot over peer GPU memory + NCCL) for GPU ranks on one "
                        "host, zmq through the coordinator "
                        "otherwise; the startup log says which and why)")
    p.add_argument("--head-at", choices=HEAD_AT, default="auto",
                   help="where Ray ranks' embedding + lm_head run (auto: on rank 0 for GPU ranks on "
                        "this host, so a step sends token ids and gets the argmax back; at the "
                        "coordinator otherwise)")
    p.add_argument("--rank-timeout", type=float, default=60.0,
                   help="seconds without an answer before a rank counts as dead")
    p.add_argument("--log-level", default="info", help="logging level")


def _load(args):
    import tpserve
    from tpserve import demo
    from tpserve.serve.text import TextCodec

    if args.model:
        path = args.model
    else:
        path = demo.demo_path()
        log.info("no --model given: serving the embedded demo model %s (random weights in GPTQ "
                 "format, 4 layers, hidden 256; its text is gibberish) from %s", demo.NAME, path)
    opts = options_from_args(args)
    options = {}
    if args.backend == "ray":
        options = dict(address=args.address, placement=args.placement, timeout_s=args.rank_timeout,
                       allreduce=args.allreduce, head_at=args.head_at, progress=True)
    llm = tpserve.load(path, tp=opts.tp, backend=opts.backend, device=opts.device,
                       dtype=opts.dtype, max_model_len=opts.max_model_len,
                       num_slots=opts.num_slots, lm_head=opts.lm_head, **options)
    return path, llm, TextCodec.load(path)


def cmd_launch(args) -> int:
    from tpserve import __version__
    from tpserve.errors import TpserveError
    from tpserve.serve.batch import check_decode_steps
    from tpserve.serve.engine import Engine
    from tpserve.serve.app import build_app
    from tpserve.serve.limits import MAX_BODY_MB
    from tpserve.serve.middleware import ApiKey, body_limit
    from tpserve.serve.server import serve

    if getattr(args, "model_tag", None):  # `tpserve serve MODEL`
        args.model = args.model_tag
    options_from_args(args)  # a bad --tp/--device/... is one sentence, before anything starts
    check_decode_steps(args.decode_steps)
    for flag, value in (("--max-queue", args.max_queue), ("--max-prefill-tokens",
                                                          args.max_prefill_tokens),
                        ("--max-connections", args.max_connections)):
        if value < 1:
            raise TpserveError(f"{flag} {value} must be at least 1")
    if args.max_body_mb is not None and not 1 <= args.max_body_mb <= MAX_BODY_MB:
        raise TpserveError(f"--max-body-mb {args.max_body_mb} must be in [1, {MAX_BODY_MB}]; "
                           f"leave it out for a limit that follows the context")
    api_key = args.api_key or os.environ.get("TPSERVE_API_KEY")
    if api_key:
        ApiKey.checked(api_key)
    check_port(args.host, args.port)
    path, llm, codec = _load(args)
    if args.verify:
        from tpserve.verify import verify_llm
        report = verify_llm(llm, path, codec=codec)
        print(report.format(), file=sys.stderr)
        if not report.passed:
            log.error("--verify failed: not serving a deployment that differs from tp=1")
            llm.close()
            return 1
    if codec is None:
        log.warning("%s has no tokenizer.json: only token-id prompts will work", path)
    from tpserve import demo
    # The model id: --served-model-name, else the folder's name (the demo's without its version).
    name = args.served_model_name or (demo.NAME if not args.model else
                                      os.path.basename(os.path.normpath(str(path))))
    engine = Engine(llm, codec, max_queue=args.max_queue, decode_steps=args.decode_steps,
                    max_prefill_tokens=args.max_prefill_tokens).start()
    try:
        limit = (body_limit(engine.max_len) if args.max_body_mb is None
                 else args.max_body_mb << 20)
        app = build_app(engine, codec, name, version=__version__,
                        api_key=api_key,
                        max_body_bytes=limit)
        log.info("request bodies up to %d MiB (--max-body-mb)", limit >> 20)
        log.info("serving %r at http://%s:%d/v1 (tp=%d, backend=%s)", name, args.host, args.port,
                 args.tp, args.backend)
        serve(app, args.host, args.port, log_level=args.log_level,
              max_connections=args.max_connections)
    finally:
        log.info("shutting down: stopping the engine and the ranks")
        engine.stop()
        llm.close()
    return 0


def cmd_generate(args) -> int:
    from tpserve.errors import TpserveError

    path, llm, codec = _load(args)
    try:
        if args.prompt_ids:
            ids = [int(t) for t in args.prompt_ids.split(",")]
        elif codec is None:
            raise TpserveError(f"{path} has no tokenizer.json; pass --prompt-ids 1,2,3")
        elif args.chat:
            ids = codec.encode_chat([{"role": "user", "content": args.prompt}])
        else:
            ids = codec.encode(args.prompt)
        t0 = time.perf_counter()
        out = llm.generate(ids, max_tokens=args.max_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           ignore_eos=args.ignore_eos)
        dt = time.perf_counter() - t0
        print(codec.decode(out) if codec is not None else out)
        print(f"tokens: {out}", file=sys.stderr)
        print(f"{len(out)} tokens in {dt:.2f}s ({len(out) / dt:.1f} tok/s)", file=sys.stderr)
    finally:
        llm.close()
    return 0


def _launch_arguments(p: argparse.ArgumentParser) -> None:
    from tpserve.serve.limits import (BODY_READ_TIMEOUT_S, BYTES_PER_TOKEN,
                                      DEFAULT_MAX_CONNECTIONS, HEADER_READ_TIMEOUT_S, MIN_BODY_BYTES)

    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every path but /health, "
                                      "/metrics, /version (or TPSERVE_API_KEY)")
    p.add_argument("--served-model-name", help="model id in the API (default: the folder name)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help=f"HTTP connections served at once; a request beyond them gets 503 (a "
                        f"connection must send its headers within {HEADER_READ_TIMEOUT_S:g} s, "
                        f"its body within {BODY_READ_TIMEOUT_S:g} s)")
    p.add_argument("--max-body-mb", type=int, default=None,
                   help=f"request bodies over this many MiB get 413 unread (default: "
                        f"{BYTES_PER_TOKEN} bytes per token of the context, at least "
                        f"{MIN_BODY_BYTES >> 20}; JSON is parsed on the event loop, so a larger "
                        f"limit lets one request stall the others longer)")
    p.add_argument("--max-prefill-tokens", type=int, default=8192,
                   help="prompt tokens one step prefills (whole prompts; a longer one runs alone)")
    p.add_argument("--decode-steps", type=int, default=8,
                   help="decode steps the ranks run per engine step where they hold the head, "
                        "while every running request decodes and none waits: greedy ones, or "
                        "sampled ones where the ranks sample (rank 0 holding the head, or tp=1 "
                        "in-process) (each step's token feeds "
                        "the next on the ranks; tokens stream in bursts of up to this many; 1: "
                        "one step at a time)")
    p.add_argument("--verify", action="store_true",
                   help="check the deployment against tp=1 (`tpserve verify`) before serving")
    p.set_defaults(func=cmd_launch)


class _Help(argparse.HelpFormatter):
    """Help that shows every default, unless the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and "default" not in text
                and action.default not in (None, False, argparse.SUPPRESS)):
            text += " (default: %(default)s)"
        return text


@contextlib.contextmanager
def _stdout_for_the_result(args):
    """With --json, stdout carries the JSON alone: whatever else writes to file descriptor 1 (Ray,
    its raylet, child processes) or to sys.stdout goes to stderr meanwhile; what the command
    writes to `args.stdout` reaches stdout at the end."""
    if not getattr(args, "json", False):
        args.stdout = sys.stdout
        yield
        return
    saved, real = sys.stdout, os.dup(1)
    saved.flush()
    os.dup2(2, 1)
    args.stdout, sys.stdout = io.StringIO(), sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 1)
        os.close(real)
        sys.stdout = saved
        saved.write(args.stdout.getvalue())
        saved.flush()


def main(argv=None) -> int:
    fmt = _Help
    parser = argparse.ArgumentParser(prog="tpserve", description=__doc__.split("\n")[0],
                                     formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("launch", help="serve an OpenAI-compatible API", formatter_class=fmt)
    _launch_arguments(p)
    p = sub.add_parser("serve", help="`tpserve serve MODEL`: vLLM's spelling of `launch --model "
                                     "MODEL`", formatter_class=fmt)
    p.add_argument("model_tag", nargs="?", metavar="MODEL", help="checkpoint folder")
    _launch_arguments(p)

    p = sub.add_parser("generate", help="generate once and print the text", formatter_class=fmt)
    _common(p)
    p.add_argument("--prompt", default="Hello", help="text to continue")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--ignore-eos", action="store_true", help="generate past the eos token")
    p.set_defaults(func=cmd_generate)

    for name, helptext in (("verify", "prove the TP deployment computes the unsharded model"),
                           ("submit", "submit `tpserve launch ...` as a Ray Job and stream its logs")):
        module = __import__(f"tpserve.{name}", fromlist=["add_arguments", "run"])
        p = sub.add_parser(name, help=helptext, formatter_class=fmt)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    for p in sub.choices.values():
        p.set_defaults(parser=p)

    # An unknown flag is reported with the usage of the subcommand it was given to.
    args, extra = parser.parse_known_args(argv)
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from tpserve.errors import TpserveError
    try:
        with _stdout_for_the_result(args):
            return args.func(args)
    except TpserveError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
