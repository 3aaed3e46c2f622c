"""The chain on Flower's simulation and deployment engines (the ``flower`` extra).

``server_app.app`` drives our coordinator's chain state machine over Flower messages;
``client_app.app`` does our agent's round work on a SuperNode; ``records`` is what travels.
``pyproject.toml`` beside this file makes the folder a Flower App: ``flwr run
agent/app/flower``. Nothing outside this package imports it (flwr is an optional extra).
"""
