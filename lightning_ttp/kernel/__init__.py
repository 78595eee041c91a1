"""The empirical NTK of a PyTorch model: exact (fast paths + torch.func fallback) or randomly projected.

Pure torch: knows nothing of Lightning or of optimisers.
"""

from lightning_ttp.kernel.cost import NTKCost, NTKCount, count_ntk_macs, estimate_ntk_cost
from lightning_ttp.kernel.memory import NTKMemoryError
from lightning_ttp.kernel.ntk import NTK, empirical_ntk
from lightning_ttp.kernel.shard import Sharding

__all__ = ["NTK", "NTKCost", "NTKCount", "NTKMemoryError", "Sharding", "count_ntk_macs", "empirical_ntk",
           "estimate_ntk_cost"]
