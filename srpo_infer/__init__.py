"""srpo_infer: fast inference for Tencent's SRPO (FLUX.1-dev fine-tune) on one GPU.

>>> import srpo_infer
>>> pipe = srpo_infer.load_pipeline(model="tiny-random", progress=False)
>>> result = pipe.generate("a T-Rex on a beach", width=1440, height=512, seed=490733907, num_inference_steps=2)
>>> result.images[0].size, result.seed
((1440, 512), 490733907)
"""

from .checkpoint import CheckpointError, load_transformer
from .config import PipelineConfig
from .loading import default_pipeline, diffusers_pipeline, generate, load_pipeline
from .optimize import optimize
from .pipeline import PromptTruncatedWarning, SRPOPipeline
from .request import IMAGE_SIZE_PRESETS, GenerationRequest, validate_request
from .result import GenerationResult

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "GenerationRequest",
    "GenerationResult",
    "IMAGE_SIZE_PRESETS",
    "PipelineConfig",
    "PromptTruncatedWarning",
    "SRPOPipeline",
    "default_pipeline",
    "diffusers_pipeline",
    "generate",
    "load_pipeline",
    "load_transformer",
    "optimize",
    "validate_request",
    "__version__",
]
