"""The model runtime: config, checkpoint and safetensors I/O, attention, the BERT and
LLaMA blocks, the streamed LM head, the streaming model, LoRA wrapping, generation.
Imports kernels and proto only.
"""
