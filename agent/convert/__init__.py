"""Getting models in and results out: packaged assets, GGUF import, PEFT and merged
export. Imports runtime, kernels and proto.
"""
