"""The command line's subcommands, shared option groups, the simulation and its
reports: the composition root, the only part of the agent that may import the
coordinator's public API.
"""
