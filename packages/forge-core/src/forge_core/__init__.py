"""forge-core: the accelerator registry, distributed set-up, device mesh and collectives of Forge.

Published as ``forge-ml-core`` (the name ``forge-core`` on PyPI belongs to an unrelated
project); imported as ``forge_core``.
"""

from forge_core.accelerator import Accelerator, Capabilities, CpuAccelerator, CudaAccelerator
from forge_core.backends import (
    available_backends,
    current_accelerator,
    get_backend,
    register_backend,
    set_accelerator,
    unregister_backend,
)
from forge_core.distributed import (
    DistributedEnv,
    init_distributed,
    read_launch_env,
    shutdown_distributed,
)
from forge_core.parallel_dims import ParallelDims, ParallelMesh

__version__ = "0.1.0"

__all__ = [
    "Accelerator",
    "Capabilities",
    "CpuAccelerator",
    "CudaAccelerator",
    "DistributedEnv",
    "ParallelDims",
    "ParallelMesh",
    "available_backends",
    "current_accelerator",
    "get_backend",
    "init_distributed",
    "read_launch_env",
    "register_backend",
    "set_accelerator",
    "shutdown_distributed",
    "unregister_backend",
]
