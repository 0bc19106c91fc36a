"""The ``tiny-random`` model: every Flux component at toy size, random weights from a fixed seed.

It has the real architecture (double and single stream blocks, 3-axis RoPE, guidance embedder, a
4-level VAE with the real 8× scale factor, CLIP-L and T5 shaped encoders, byte-level tokenizers) so
the whole pipeline, the loaders and the kernels' wiring are exercised on a CPU in seconds, with no
download. It makes noise, not pictures.
"""

from __future__ import annotations

import torch

TINY_SEED = 20251125

# The transformer shape. head_dim 32 keeps the real Flux RoPE split rule (head_dim/8, 7/16, 7/16).
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels × 2×2 packing
    out_channels=None,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)

_SPECIALS = ["<pad>", "</s>", "<unk>", "<|startoftext|>", "<|endoftext|>"]


def _byte_level_tokenizer(kind: str, model_max_length: int):
    """A byte-level tokenizer built in code: every string tokenizes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if kind == "clip":
        bos, eos, pad = "<|startoftext|>", "<|endoftext|>", "<|endoftext|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=bos,
            eos_token=eos,
            pad_token=pad,
            unk_token="<unk>",
            model_max_length=model_max_length,
        )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=model_max_length
    )


def tiny_vocab_size() -> int:
    """Size of the tiny tokenizers' vocabulary (specials + 256 byte symbols)."""
    return len(_SPECIALS) + 256


def build_tiny_transformer(seed: int = TINY_SEED):
    """The tiny ``FluxTransformer2DModel`` with weights drawn from ``seed`` (global RNG untouched)."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
        # diffusers zero-initialises nothing here, but make every weight non-trivial anyway so a
        # loader that silently skips a tensor changes the output.
        for p in model.parameters():
            p.data.normal_(0.0, 0.2) if p.ndim > 1 else p.data.uniform_(-0.1, 0.1)
    return model.eval()


def build_tiny_base(seed: int = TINY_SEED) -> dict:
    """VAE, CLIP and T5 encoders, their tokenizers and the Flux scheduler, all tiny.

    >>> sorted(build_tiny_base())[:3]
    ['scheduler', 'text_encoder', 'text_encoder_2']
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab = tiny_vocab_size()
    clip_tok = _byte_level_tokenizer("clip", 77)
    t5_tok = _byte_level_tokenizer("t5", 512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        )
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=vocab,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=t5_tok.pad_token_id,
                eos_token_id=t5_tok.eos_token_id,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "scheduler": scheduler,
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": clip_tok,
        "tokenizer_2": t5_tok,
        "vae": vae.eval(),
    }


def write_tiny_lora(path: str, rank: int = 4, seed: int = 0, strength: float = 0.3) -> str:
    """Write a LoRA for the tiny model (diffusers/PEFT names, every double block's attention
    projections, random factors of ``strength``) to ``path``, so per-request LoRAs can be tried on a CPU:

    python -c "from srpo_infer.tiny import write_tiny_lora; write_tiny_lora('loras/sketch.safetensors')"

    It changes the tiny model's noise, nothing more. Returns the path written.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    if not (isinstance(rank, int) and 1 <= rank <= 128):
        raise ValueError(f"rank must be an integer in [1, 128], got {rank!r}")
    width = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(TINY_TRANSFORMER_CONFIG["num_layers"]):
        for layer in ("to_q", "to_k", "to_v", "to_out.0"):
            prefix = f"transformer.transformer_blocks.{block}.attn.{layer}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, width, generator=g) * strength
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, rank, generator=g) * strength
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out)
    return str(out)
