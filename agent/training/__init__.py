"""Training on one device: data reading, objectives, GPO, CKA/FOAT, the prefix cache,
the chain trainer, the budget planner and the memory meter. Imports runtime, kernels
and proto.
"""
