"""The autotuning every tuned kernel shares: Triton's autotuner with a short benchmark, its
results cached on disk (Triton's cache folder, so a second launch skips the benchmarks), and no
tuning under TRITON_INTERPRET=1, where callers pass fixed configs."""

from __future__ import annotations

import os

import triton


def _bench(fn, quantiles):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def autotuned(kernel, configs, key, prune=None):
    """The autotuned kernel, or None under the interpreter. `prune`: an early_config_prune."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    by = None if prune is None else {"early_config_prune": prune}
    try:
        return triton.autotune(configs, key=key, prune_configs_by=by, do_bench=_bench,
                               cache_results=True)(kernel)
    except TypeError:  # an older triton without do_bench= / cache_results=
        return triton.autotune(configs, key=key, prune_configs_by=by)(kernel)
