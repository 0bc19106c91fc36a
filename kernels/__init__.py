"""Triton kernels, installed as ``srpo_infer.kernels`` (never as a top-level ``kernels``)."""
