"""The agent's side of the federation: its round work and its client loop. Imports
training, runtime, kernels and proto.
"""
