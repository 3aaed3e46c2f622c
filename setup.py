"""Installs the four root code folders under the ``chainfed`` import namespace.

``agent/`` becomes ``chainfed.agent`` and so on (a ``package_dir`` mapping), so nothing
generic such as ``agent`` or ``proto`` lands at the top level of site-packages.
``chainfed`` itself is an implicit namespace package.
"""

from setuptools import find_packages, setup

FOLDERS = ("agent", "kernels", "coordinator", "proto")
PACKAGES = [
    f"chainfed.{folder}{'.' + sub if sub else ''}"
    for folder in FOLDERS
    for sub in ("", *find_packages(folder))
]

AGENT = ["tokenizers>=0.19", "psutil>=5.9", "tqdm>=4.60", "jinja2>=3.1"]
"""The agent: tokenisation, memory metering, progress bars, chat templates."""
GGUF = ["gguf>=0.10"]
"""GGUF import (``chainfed convert-gguf``, the ``smollm2`` alias)."""
PLOTS = ["matplotlib>=3.7"]
"""The plots of ``chainfed demo``/``simulate`` and the benchmarks."""
DP = ["dp-accounting>=0.4"]
"""Privacy accounting of ``--dp-noise-multiplier`` (the coordinator's)."""

setup(
    name="chainfed",
    version="0.1.0",
    description="Federated layer-by-layer (chain) LoRA fine-tuning for memory-limited edge devices",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={f"chainfed.{name}": name for name in FOLDERS},
    package_data={"chainfed.proto": ["*.proto", "*.pyi"]},
    # What a coordinator-only box needs (``python -m chainfed.coordinator --model-spec``):
    # the aggregation arithmetic, safetensors state files, gRPC with the standard health
    # service (same release line as grpcio; it requires protobuf <8 itself) and the
    # Prometheus client of ``--metrics-port``. The agent's stack and the optional parts come
    # as extras; ``dev`` installs everything the demo and the tests use (the README's set-up
    # line).
    install_requires=[
        "torch>=2.3",
        "safetensors>=0.4",
        "numpy>=1.24",
        "grpcio>=1.85.1",
        "grpcio-health-checking>=1.85.1",
        "protobuf>=7.35.1",
        "prometheus-client>=0.20,<1",
    ],
    extras_require={
        "agent": AGENT,
        "gguf": GGUF,
        "plots": PLOTS,
        "dp": DP,
        "gpu": ["triton>=3.0"],
        "all": AGENT + GGUF + PLOTS + DP,
        # Exact versions known to pass: the tests compare against these (parity with
        # transformers/peft, the generated protobuf modules, ruff's format, the fuzzers'
        # derandomised examples, the Triton interpreter), so a new upstream release must
        # not turn CI red. Raise a pin in its own commit, after the suite passes with it.
        "dev": AGENT
        + GGUF
        + PLOTS
        + DP
        + [
            "pytest>=8,<10",
            "ruff==0.17.6",
            "transformers==5.24.0",
            "peft==0.21.2",
            "hypothesis==6.170.17",
            "grpcio-tools==1.85.1",
            "triton==3.9.0",
        ],
    },
    entry_points={"console_scripts": ["chainfed=chainfed.agent.cli:main"]},
)
