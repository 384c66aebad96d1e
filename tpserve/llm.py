"""`tpserve.load(...)`: the public Python entry point shared by users, tests and benchmarks."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tpserve.model.config import load_configs
from tpserve.errors import TpserveError
from tpserve.kernels import HeadFormat
from tpserve.model.head import Head
from tpserve.model.kv_cache import StepPlan
from tpserve.options import DeployOptions
from tpserve.serve.engine import Engine
from tpserve.serve.sampling_params import SamplingParams

log = logging.getLogger("tpserve")


class LLM:
    """A loaded model: `logits(ids)` and `generate(ids, ...)` for one sequence at a time."""

    def __init__(self, path: Path, cfg, quant, executor, head: Head | None, dtype: torch.dtype,
                 tp: int, device: str = "cpu", lm_head: str = "auto"):
        self.path, self.cfg, self.quant = path, cfg, quant
        self.executor, self.dtype, self.tp = executor, dtype, tp
        # None where the ranks hold the head (Ray GPU ranks on this host: `executor.head_bytes`)
        self.head = head
        self.device, self.lm_head = device, lm_head  # the device kind, the head's resolved format
        self._engine: Engine | None = None

    @torch.inference_mode()
    def _forward(self, token_ids: list[int], start: int, out_rows) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        plan = StepPlan(slots=[0], starts=[start], lens=[len(token_ids)], out_rows=out_rows)
        logits, argmax = self.step(ids, plan)
        return logits if argmax is None else logits.clone()  # a captured step's buffer is reused

    def step(self, ids: torch.Tensor, plan: StepPlan, need_logits: bool = True
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One step of token ids [T] (host): fp32 logits of the rows `plan.out_rows`, and their
        argmax where the ranks computed it with the head (else None). A captured step's outputs
        are its static buffers: valid until the next step. With need_logits=False the logits may
        be None where the ranks hold the head (only the argmax crossed to this process)."""
        fused = self.executor.step_ids(ids, plan, need_logits)
        if fused is not None:
            return fused
        return self.head.logits(self.executor.step(self.head.embed(ids), plan)), None

    def _check(self, token_ids) -> list[int]:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise TpserveError("token_ids is empty; pass at least one token id")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise TpserveError(f"token id {bad[0]} is outside the vocabulary [0, "
                               f"{self.cfg.vocab_size})")
        return ids

    def logits(self, token_ids) -> torch.Tensor:
        """fp32 logits [len(token_ids), vocab] of one sequence."""
        return self._forward(self._check(token_ids), 0, None)

    def generate(self, token_ids, max_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_token_ids=(),
                 ignore_eos: bool = False, **sampling) -> list[int]:
        """Continue one sequence; stops at max_tokens, a stop token or the model's eos. Further
        keywords are `SamplingParams` fields (min_p, repetition_penalty, logit_bias, ...)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop_token_ids=tuple(stop_token_ids),
                                ignore_eos=ignore_eos, **sampling)
        if self._engine is None:  # not started: it steps in this thread, one request at a time
            self._engine = Engine(self)
        return self._engine.generate(self._check(token_ids), params)

    def close(self) -> None:
        self.executor.close()


def load(model_path, tp: int = 1, backend: str = "local", dtype: torch.dtype | str | None = None,
         device: str = "cpu", max_model_len: int | None = None, num_slots: int = 8,
         lm_head: str = "auto", cuda_graphs: bool = True, **ray_options) -> LLM:
    """Load a GPTQ checkpoint folder sharded over `tp` ranks.

    backend "local" runs the ranks as threads of this process; "ray" runs them as Ray actors with
    the ZMQ coordinator (the `tpserve launch` path); `ray_options` go to `RayExecutor` (address,
    placement, timeout_s, curve, progress, allreduce, head_at). dtype defaults to the config's
    dtype. lm_head picks the head's format: auto, dense, int8, q8_0 or gptq
    (`tpserve.model.lm_head`).
    """
    path = Path(model_path)
    opts = DeployOptions(tp=tp, backend=backend, device=device, dtype=dtype,
                         max_model_len=max_model_len, num_slots=num_slots, lm_head=lm_head)
    cfg, quant = load_configs(path)
    opts.check_model(cfg)  # before Ray starts or any weight is read
    if quant is None:
        log.warning("%s has no GPTQ quantization_config: serving its dense (unquantized) weights",
                    path)
    dtype = opts.dtype or cfg.dtype
    if device == "cpu" and dtype == torch.float16:
        log.info("float16 on CPU is slow and imprecise in places; consider dtype=float32")
    max_len = min(max_model_len or cfg.max_position, cfg.max_position)
    if ray_options and backend != "ray":
        raise TpserveError(f"options {sorted(ray_options)} apply to backend='ray' only")
    if backend == "local":
        from tpserve.runtime.local_executor import LocalExecutor
        head = Head.load(path, cfg, quant, dtype, device, mode=lm_head)
        executor = LocalExecutor(path, cfg, quant, tp, dtype, device, num_slots, max_len,
                                 cuda_graphs, head)
    else:
        from tpserve.runtime.ray_executor import RayExecutor
        executor = RayExecutor(path, cfg, quant, tp, dtype, device, num_slots, max_len,
                               lm_head=lm_head, **ray_options)
        # The head is the coordinator's, here, unless it placed it on rank 0 (`head_at`).
        head = None if executor.head_bytes else Head.load(path, cfg, quant, dtype, device,
                                                           mode=lm_head)
    log.info("loaded %s (%s, %d layers) at tp=%d on %s, backend=%s", path, cfg.arch,
             cfg.num_layers, tp, device, backend)
    fmt = executor.head_format if head is None else HeadFormat(head.lm_head.mode).value
    return LLM(path, cfg, quant, executor, head, dtype, tp, device, fmt)
