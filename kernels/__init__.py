"""Fused LoRA linear (Triton forward/backward) and the torch reference it is tested against."""
