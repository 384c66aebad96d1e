"""The `tpserve` command: launch (OpenAI-compatible server), generate (one shot).

    tpserve launch --tp 4                      # the embedded demo model, private Ray cluster
    tpserve launch --model /ckpt --tp 2 --address auto --device cuda
    tpserve generate --model /ckpt --tp 2 --prompt "Hello"
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

log = logging.getLogger("tpserve")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GPTQ checkpoint folder (default: the embedded demo model)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (ranks)")
    p.add_argument("--backend", choices=["ray", "local"], default="ray",
                   help="ray: one Ray actor per rank + ZMQ coordinator; local: ranks as threads")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a private "
                                     "local cluster)")
    p.add_argument("--placement", choices=["strict_pack", "pack", "spread"], default="strict_pack",
                   help="strict_pack: all ranks on one node; pack: spill over nodes")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype (default: the config's; float32 on CPU)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the config's)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="KV slots = concurrent sequences")
    p.add_argument("--lm-head", choices=["auto", "dense", "int8", "q8_0", "gptq"], default="auto",
                   help="lm_head format at the coordinator (auto: the checkpoint's GPTQ head, else "
                        "int8 for tables of 64 MiB or more, else dense)")
    p.add_argument("--rank-timeout", type=float, default=60.0,
                   help="seconds without an answer before a rank counts as dead")
    p.add_argument("--log-level", default="info")


def _load(args):
    import torch

    import tpserve
    from tpserve import demo
    from tpserve.serve.text import TextCodec

    if args.model:
        path = args.model
    else:
        path = demo.demo_path()
        log.info("no --model given: serving the embedded demo model %s (random weights in GPTQ "
                 "format, 4 layers, hidden 256; its text is gibberish) from %s", demo.NAME, path)
    dtype = args.dtype or ("float32" if args.device == "cpu" else None)
    options = {}
    if args.backend == "ray":
        options = dict(address=args.address, placement=args.placement, timeout_s=args.rank_timeout,
                       progress=True)
    llm = tpserve.load(path, tp=args.tp, backend=args.backend, device=args.device,
                       dtype=getattr(torch, dtype) if dtype else None,
                       max_model_len=args.max_model_len, num_slots=args.max_num_seqs,
                       lm_head=args.lm_head, **options)
    return path, llm, TextCodec.load(path)


def cmd_launch(args) -> int:
    from tpserve.serve.engine import Engine
    from tpserve.serve.server import build_app, serve

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
    name = args.served_model_name or os.path.basename(os.path.normpath(str(path)))
    engine = Engine(llm, codec, max_queue=args.max_queue).start()
    try:
        app = build_app(engine, codec, name, api_key=args.api_key or os.environ.get("TPSERVE_API_KEY"))
        log.info("serving %r at http://%s:%d/v1 (tp=%d, backend=%s)", name, args.host, args.port,
                 args.tp, args.backend)
        serve(app, args.host, args.port, log_level=args.log_level)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tpserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("launch", help="serve an OpenAI-compatible API")
    _common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (or TPSERVE_API_KEY)")
    p.add_argument("--served-model-name", help="model id in the API (default: the folder name)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--verify", action="store_true",
                   help="check the deployment against tp=1 (`tpserve verify`) before serving")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("generate", help="generate once and print the text")
    _common(p)
    p.add_argument("--prompt", default="Hello")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(func=cmd_generate)

    for name, helptext in (("verify", "prove the TP deployment computes the unsharded model"),
                           ("submit", "submit `tpserve launch ...` as a Ray Job and stream its logs")):
        try:
            module = __import__(f"tpserve.{name}", fromlist=["add_arguments", "run"])
        except ImportError:
            continue
        p = sub.add_parser(name, help=helptext)
        module.add_arguments(p)
        p.set_defaults(func=module.run)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from tpserve.errors import TpserveError
    try:
        return args.func(args)
    except TpserveError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
