"""Parallel training: the launch and its world (launch), the strategies behind one protocol
(strategies), gradient compression hooks (comm_hooks) and tensor-parallel sizes (tensor_parallel)."""
