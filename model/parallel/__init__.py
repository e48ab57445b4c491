"""Tensor parallelism for the Llama family (Megatron-style), over torch.distributed.

- `group.py`: `TPGroup`, this rank's place in the group and the collectives the model uses
  (gloo on the CPU, NCCL on GPUs), each with the group's timeout;
- `sharding.py`: `TPShard`, which part of every weight a rank holds (query heads, KV heads
  split or replicated, MLP columns, a vocabulary range) and the refusal of what cannot split;
- `layers.py`: `TensorParallelCausalLM`: row-parallel o/down projections that all-reduce,
  the vocab-parallel embedding and LM head;
- `weights.py`: checkpoint tensors sliced to a rank's shard; synthetic weights drawn whole
  and sliced, so every tensor-parallel size serves the same synthetic model;
- `runner.py`: the rank-0 runner that sends each step to the other ranks before running it,
  the followers' loop, and the samplers that share rank 0's tokens;
- `channel.py`: rank 0's per-step messages to the other ranks (pipes, one pickle per step).

The server side (spawning the ranks, their set-up, the liveness watchdog) is
server/engine/tensor_parallel.py; docs/tensor-parallel.md says why it is built this way.
"""
