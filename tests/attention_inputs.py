"""Helpers for the attention tests (inputs and error measure come from the library)."""

from __future__ import annotations

import torch

from srpo_infer.attention import random_attention_inputs as make_inputs
from srpo_infer.bench.deviation import relative_error as rel_err

__all__ = ["as_float64", "make_inputs", "rel_err"]


def as_float64(x):
    return x.to(torch.float64)
