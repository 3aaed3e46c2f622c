"""The base of every error ChainFed raises on purpose, shared by agent and coordinator.

A failure a user can cause with their input (a wrong folder, a corrupt file, a malformed
option) surfaces as a subclass with a message that names the problem, so a command line
prints it in one line, without a traceback.
"""


class ChainFedError(Exception):
    """Base class of every error ChainFed raises on purpose."""
