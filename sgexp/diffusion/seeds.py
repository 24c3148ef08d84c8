"""Per-index randomness: sample ``i`` draws everything from seeds of ``(base_seed, i)``.

Its initial noise, its label (in ``uniform`` mode), its routing masks and ICG's
random class come from its own generators, never from a batch-wide stream. A sample is therefore
the same whatever the batch size, the order of generation or the number of
processes, and two guidance settings evaluated on the same indices differ only
by the setting (common random numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sgexp.checks import check_choice, check_positive_int

# Independent streams per index.
NOISE, LABEL, ROUTING, RANDOM_LABEL = 0, 1, 2, 3
LABEL_MODES = ("balanced", "uniform")


def index_seed(base_seed: int, index: int, stream: int) -> int:
    """A 63-bit seed for ``(base_seed, index, stream)``, well mixed by NumPy's SeedSequence."""
    lo, hi = np.random.SeedSequence([base_seed, index, stream]).generate_state(2, dtype=np.uint32)
    return (int(hi) << 32 | int(lo)) & (2**63 - 1)


def index_generator(base_seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for one index and stream (CPU, so values do not depend on the device)."""
    return torch.Generator().manual_seed(index_seed(base_seed, index, stream))


def initial_noise(indices: Sequence[int], shape: Sequence[int], base_seed: int) -> torch.Tensor:
    """ε for each index: (len(indices), *shape), on the CPU."""
    return torch.stack([torch.randn(tuple(shape), generator=index_generator(base_seed, i, NOISE)) for i in indices])


def sample_labels(indices: Sequence[int], num_classes: int, base_seed: int, mode: str = "balanced") -> torch.Tensor:
    """Class label per index.

    ``balanced``: ``i mod num_classes``, so any run of indices is spread evenly
    over classes. ``uniform``: uniform over classes, drawn from the index's own
    generator, as DiT's and SiT's ``sample_ddp.py`` draw labels; sample ``i`` still
    has the same label in every setting, batch and process.
    """
    check_positive_int("num_classes", num_classes)
    check_choice("label_mode", mode, LABEL_MODES)
    if mode == "balanced":
        return torch.tensor([i % num_classes for i in indices], dtype=torch.long)
    gens = (index_generator(base_seed, i, LABEL) for i in indices)
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in gens])


def random_labels(indices: Sequence[int], num_classes: int, base_seed: int) -> torch.Tensor:
    """ICG's random class c̃ per index: uniform over ``num_classes``, from the index's own stream
    (independent of its label, even in ``uniform`` label mode); one per trajectory."""
    check_positive_int("num_classes", num_classes)
    gens = (index_generator(base_seed, i, RANDOM_LABEL) for i in indices)
    return torch.cat([torch.randint(num_classes, (1,), generator=g) for g in gens]).to(torch.long)


def routing_generators(indices: Sequence[int], base_seed: int) -> list[torch.Generator]:
    """One generator per index for the routing masks of every pass of its trajectory."""
    return [index_generator(base_seed, i, ROUTING) for i in indices]
