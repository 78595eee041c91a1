"""Memory budget: estimate the peak before allocating and fail with a message that says what to change."""

from __future__ import annotations

import os

import torch

GIB = 2**30


class NTKMemoryError(MemoryError):
    """The requested kernel does not fit the memory budget."""


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, else MemAvailable from /proc/meminfo (else 8 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def default_budget(device: torch.device) -> int:
    """Half of what is free now: the rest stays for the training that follows."""
    env = os.environ.get("LIGHTNING_TTP_MEMORY_BUDGET_GIB")
    if env:
        return int(float(env) * GIB)
    return available_memory(device) // 2


def check_budget(
    estimate: int, budget: int, *, num_samples: int, num_outputs: int, kernel: str, projected: bool
) -> None:
    if estimate <= budget:
        return
    options = [f"fewer samples (now N={num_samples}; memory grows like N²)"]
    if kernel == "full" and num_outputs > 1:
        options.append(f'kernel="trace" ({num_outputs}² = {num_outputs**2}× smaller Gram)')
    if not projected:
        options.append('a random projection (projection_dim=1024, projection="kronecker")')
    else:
        options.append("a smaller projection_dim")
    options.append("a larger memory_budget (bytes) if the machine really has the memory")
    raise NTKMemoryError(
        f"the empirical NTK needs about {estimate / GIB:.2f} GiB, over the budget of {budget / GIB:.2f} GiB. "
        "Options: " + "; ".join(options) + "."
    )
