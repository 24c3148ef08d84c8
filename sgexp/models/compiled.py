"""torch.compile of the network's tensor computation, with the random draws left outside.

A TREAD step draws label dropout and the kept tokens of each route from a per-step
``torch.Generator`` (``sgexp.models.routing.select_tokens``). Those draws run eagerly,
before the compiled region; what is compiled (``sgexp.models.dit.denoise``,
``embed_prefix``, ``run_suffix`` and the guided step of ``sgexp.diffusion.guidance``)
takes the drawn indices as inputs. So:

* every shape inside is static: a route keeps exactly ``N − floor(N·γ)`` tokens, so the
  index tensors fix the shapes, one graph per kept count (``dynamic=False``);
* the graph has no breaks (``fullgraph=True`` turns a break into an error, and
  ``tests/test_compile.py`` checks ``torch._dynamo.explain``);
* the masks are those of the eager path, bit for bit: only the arithmetic differs
  (kernel fusion reorders floating-point sums; ``tests/test_compile.py`` states the tolerance);
* CUDA graphs (``mode="reduce-overhead"``) see no RNG state inside the graph.

The compiled functions take the module as their first argument, so the training model
and its EMA copy share one compiled function (their weights are graph inputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_CACHE: dict[tuple, Callable] = {}


def compiled(fn: Callable, backend: str = "inductor", mode: str | None = None) -> Callable:
    """``torch.compile(fn)`` with static shapes and no graph breaks allowed, built once per (fn, backend, mode)."""
    key = (fn, backend, mode)
    if key not in _CACHE:
        mode = None if mode == "default" else mode
        _CACHE[key] = torch.compile(fn, backend=backend, mode=mode, dynamic=False, fullgraph=True)
    return _CACHE[key]
