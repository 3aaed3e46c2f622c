"""The ChainFed wire protocol: ``chainfed.proto`` and its generated modules."""
