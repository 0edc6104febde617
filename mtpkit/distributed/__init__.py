"""Scale-out on PyTorch's own stack, applied from outside the model code (torchtitan style).

`mesh` starts the process group under torchrun and builds a (dp, tp) DeviceMesh; `sampler`
splits every global batch across data-parallel ranks; `fsdp` shards the head with FSDP2;
`tensor_parallel` shards the frozen target's decoder layers; `checkpoint` writes sharded DCP
checkpoints that resume at any world size and export to a single safetensors head.
"""

from mtpkit.distributed.mesh import DistributedConfig, Parallel, init_parallel

__all__ = ["DistributedConfig", "Parallel", "init_parallel"]
