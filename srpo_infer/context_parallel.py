"""One image on several processes (one per GPU): diffusers' context parallelism, wired to our seam.

Each process holds the whole transformer and a slice of the image's text and image tokens; attention
exchanges them, either by re-sharding heads (Ulysses: every process sees the whole sequence for
``heads / ulysses`` heads) or by passing K/V around a ring (each process sees its queries against every
key shard, merged by log-sum-exp). diffusers splits the inputs and gathers the output (hooks on the
transformer and ``proj_out``) and runs ring attention; we add what it lacks:

- **Ulysses for every backend**: our fused kernels take the projections (RMSNorm and RoPE are inside),
  so :func:`ulysses_attention` exchanges the projections rather than q/k/v (two all-to-alls per
  attention), and the split image equals one process's bit for bit;
- **any image size**: diffusers splits each stream into equal parts, so both streams are padded to a
  multiple of the degree; Ulysses cuts the padding off, ring masks it exactly (:func:`pad_keys`);
- **a CPU** (gloo), so all of this is tested without GPUs: an attention op that returns the log-sum-exp
  on the CPU (ring needs it; diffusers' are CUDA/NPU-only), and ``enable_parallelism``'s device count;
- **one request in step on every rank**: the seed, the stop decision and (for a server) the request
  itself are broadcast from rank 0, so the ranks never diverge.

Private diffusers APIs used (tested with diffusers 0.42; the dependency is pinned to ``>=0.42,<0.43``
for them): ``diffusers.models.attention_dispatch._templated_context_parallel_attention`` (the Ulysses /
ring / unified templates, called with our attention op), the ``_parallel_config`` attribute that
``enable_parallelism`` fills on processors, the config's ``_ulysses_mesh``, and
``torch.accelerator.device_count()`` being read by ``ModelMixin._resolve_parallel_config`` (0 on a CPU:
a ZeroDivisionError there). Ulysses' all-to-all is torch's functional collective
(``torch.distributed._functional_collectives``, which torch.compile traces), as in diffusers.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import attend, attention_prologue, supports_ring

log = logging.getLogger(__name__)

# Extra head channels that carry the padding mask (8: flash and cuDNN need head dims in multiples of 8).
MASK_CHANNELS = 8
# The padding keys' score before scaling: exp(-1e4 · D^-0.5) is exactly 0 in float32, and -1e4 is finite
# in float16 too.
MASKED_SCORE = -1.0e4


class ContextParallelError(RuntimeError):
    """A context-parallel peer failed (died, or a collective broke): this process cannot generate again."""


@dataclass(frozen=True)
class Degrees:
    """How ``degree`` processes split one image: ``ring`` × ``ulysses`` = ``degree``."""

    ring: int
    ulysses: int

    @property
    def degree(self) -> int:
        return self.ring * self.ulysses

    def describe(self) -> str:
        parts = [f"ulysses {self.ulysses}" if self.ulysses > 1 else "", f"ring {self.ring}" if self.ring > 1 else ""]
        return " × ".join(p for p in parts if p)


def plan_degrees(degree: int, ring_degree: int | str, heads: int) -> Degrees:
    """Split ``degree`` into ring × Ulysses. ``auto``: the largest Ulysses degree dividing both the degree
    and the head count (Ulysses moves each tensor twice per attention; ring moves K/V ``degree - 1`` times
    and merges partial softmaxes), the rest ring. Flux's 24 heads give pure Ulysses for 2, 3, 4, 6, 8, 12.

    >>> plan_degrees(4, "auto", 24), plan_degrees(3, "auto", 2), plan_degrees(16, "auto", 24)
    (Degrees(ring=1, ulysses=4), Degrees(ring=3, ulysses=1), Degrees(ring=2, ulysses=8))
    """
    if ring_degree == "auto":
        ulysses = max(u for u in range(1, degree + 1) if degree % u == 0 and heads % u == 0)
        return Degrees(degree // ulysses, ulysses)
    ulysses = degree // ring_degree
    if heads % ulysses:
        raise ValueError(
            f"ring_degree={ring_degree} leaves a Ulysses degree of {ulysses}, which does not divide the model's "
            f"{heads} attention heads: use ring_degree='auto' or one that leaves a divisor of {heads}"
        )
    return Degrees(ring_degree, ulysses)


def launched_world_size() -> int | None:
    """The process count a launcher (``torchrun``) announced, or None when this process was started alone."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def init_process_group(degree: int, device: torch.device) -> torch.device:
    """Join (or start) the process group of ``degree`` processes and return this rank's device.

    One process per GPU, started by ``torchrun --nproc-per-node DEGREE``: NCCL on CUDA (rank *i* on GPU
    ``LOCAL_RANK``), gloo on a CPU.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        world = launched_world_size()
        if world is None:
            raise ValueError(
                f"context_parallel={degree} runs one process per GPU: launch it with torchrun --nproc-per-node "
                f"{degree} (e.g. torchrun --nproc-per-node {degree} -m srpo_infer generate ... "
                f"--context-parallel {degree})"
            )
        if world != degree:
            raise ValueError(
                f"context_parallel={degree} but torchrun started {world} processes: launch with "
                f"--nproc-per-node {degree}, or pass --context-parallel {world}"
            )
    elif dist.get_world_size() != degree:
        raise ValueError(
            f"context_parallel={degree} but the process group has {dist.get_world_size()} processes: "
            f"they must be equal (one image is split over every process)"
        )
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; run at most that "
                "many processes per node"
            )
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        # A group left to the interpreter's teardown can abort the process ("terminate called without an
        # active exception", pytorch/pytorch#190489) after its work is done; whoever started it closes it.
        atexit.register(leave_process_group)
    return device


def leave_process_group() -> None:
    """Close the process group, if one is open (at exit; the CLI calls it when a command ends).

    With gloo the ranks first wait for each other (at most 30 s: a lost peer fails it at once): a rank
    that tears its group down while a peer is still finishing can abort in gloo's threads
    ("terminate called without an active exception"), after all its work is done.
    """
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
        except Exception as exc:  # a peer is gone or stuck: close ours anyway
            log.debug("leaving without the other ranks: %s", exc)
    dist.destroy_process_group()


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextlib.contextmanager
def _counts_cpu_as_one_device(device: torch.device):
    # ModelMixin._resolve_parallel_config places rank r on `rank % torch.accelerator.device_count()`,
    # which is 0 on a machine without an accelerator; gloo needs no device, so one CPU stands in.
    if device.type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


class ContextParallel:
    """Context parallelism applied to a transformer, and what the pipeline needs to keep ranks in step.

    Built by :func:`srpo_infer.optimize.apply_optimizations` when ``context_parallel > 1`` (``load_pipeline``
    only: :func:`srpo_infer.optimize` refuses it); the pipeline pads an
    image's inputs once (:meth:`fixed_inputs`) and its latents each step (:meth:`pad_latents`), cuts the
    padding off the output, and agrees on the seed and the stop decision through rank 0.
    """

    def __init__(self, transformer: torch.nn.Module, degrees: Degrees, device: torch.device, attention: str = "sdpa"):
        import torch.distributed as dist
        from diffusers import ContextParallelConfig

        if not supports_ring(attention) and degrees.ring > 1:
            raise ValueError(
                f"attention={attention!r} splits an image with Ulysses only (our kernels return no log-sum-exp for "
                f"ring attention), and {degrees.describe()} needs ring: use a context_parallel degree that divides "
                f"the model's {transformer.config.num_attention_heads} heads with ring_degree 1, or attention='sdpa'"
            )

        self.degrees = degrees
        self._rope = transformer.pos_embed  # diffusers' FluxPosEmbed: ids → (cos, sin)
        self.rank = dist.get_rank()
        # Objects (requests, seeds) travel over a gloo group: NCCL moves tensors on the GPU only.
        self._objects = dist.new_group(backend="gloo") if device.type == "cuda" else None
        config = ContextParallelConfig(ring_degree=degrees.ring, ulysses_degree=degrees.ulysses)
        with _counts_cpu_as_one_device(device), _quiet_diffusers():  # its "experimental feature" notice
            transformer.enable_parallelism(config=config)
        for processor in transformer.attn_processors.values():  # our processors split through this module
            processor.split = split_attention
        # diffusers 0.42's gather hook and ring template call a torch collective that torch 2.10+ marks
        # deprecated, once per process and rank: noise for our users, for diffusers to change.
        warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)
        log.info("context parallel: rank %d of %d, %s", self.rank, dist.get_world_size(), degrees.describe())

    @property
    def degree(self) -> int:
        return self.degrees.degree

    # ------------------------------------------------------------------ inputs

    def fixed_inputs(self, encoder_hidden_states, txt_ids, img_ids) -> dict:
        """The transformer inputs that stay the same through a denoising loop, padded to a multiple of the
        degree, with what the attention processors need in ``joint_attention_kwargs``: the real token
        counts, the whole sequence's rotary tables (for Ulysses, once per image rather than gathered per
        block) and, when anything was padded, this rank's padding mask (for ring)."""
        n_txt, n_img = encoder_hidden_states.shape[1], img_ids.shape[0]
        pad_txt, pad_img = -n_txt % self.degree, -n_img % self.degree
        rope = self._rope(torch.cat([txt_ids, img_ids]))
        joint = {"token_counts": (n_txt, n_img), "rope": rope}
        if pad_txt or pad_img:
            flags = torch.cat([self._local_pad_flags(n_txt, pad_txt), self._local_pad_flags(n_img, pad_img)])
            joint["key_padding"] = flags.to(encoder_hidden_states.device)
        return dict(
            encoder_hidden_states=F.pad(encoder_hidden_states, (0, 0, 0, pad_txt)),
            txt_ids=F.pad(txt_ids, (0, 0, 0, pad_txt)),
            img_ids=F.pad(img_ids, (0, 0, 0, pad_img)),
            joint_attention_kwargs=joint,
        )

    def pad_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The image stream padded to a multiple of the degree (what changes every step)."""
        return F.pad(latents, (0, 0, 0, -latents.shape[1] % self.degree))

    def pad(self, inputs: dict) -> dict:
        """All of one transformer call's inputs padded (:meth:`fixed_inputs` + :meth:`pad_latents`)."""
        fixed = self.fixed_inputs(inputs["encoder_hidden_states"], inputs["txt_ids"], inputs["img_ids"])
        return {**inputs, **fixed, "hidden_states": self.pad_latents(inputs["hidden_states"])}

    def _local_pad_flags(self, real: int, pad: int) -> torch.Tensor:
        # diffusers gives rank r the r-th of `degree` equal chunks (EquipartitionSharder).
        flags = torch.arange(real + pad) >= real
        return flags.chunk(self.degree)[self.rank]

    # ------------------------------------------------------------------ agreement

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        import torch.distributed as dist

        box = [value]
        try:
            dist.broadcast_object_list(box, src=0, group=self._objects)
        except Exception as exc:  # a peer is gone: gloo raises, and every later collective would too
            raise ContextParallelError(f"a context-parallel peer of rank {self.rank} failed: {exc}") from exc
        return box[0]

    def agree_stop(self, stop: bool) -> bool:
        """Rank 0's stop decision: a request is cancelled on every rank before the same step, or on none."""
        return bool(self.broadcast(bool(stop)))


def pad_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor):
    """Append :data:`MASK_CHANNELS` head channels so padding tokens get exactly zero attention weight.

    ``q``/``k``/``v``: ``[B, S, H, D]`` of this rank's tokens, ``key_padding``: ``[S]`` true for padding.
    Queries get a 1 in the first extra channel, padding keys :data:`MASKED_SCORE` there (and zeros in
    their own channels), every other key 0: a real key's score is unchanged bit for bit (it adds 1·0), a
    padding key's is ``MASKED_SCORE``, whose exponent underflows to 0. The mask travels with the keys
    through diffusers' all-to-all and around the ring, so neither needs to know about it. Pass
    ``scale=D**-0.5``: the wider head must not change the softmax scale.
    """
    pad = key_padding.view(1, -1, 1, 1)
    first = torch.zeros(MASK_CHANNELS, dtype=q.dtype, device=q.device)
    first[0] = 1.0
    shape = (*q.shape[:-1], MASK_CHANNELS)
    q = torch.cat([q, first.expand(shape)], dim=-1)
    k = torch.cat([k.masked_fill(pad, 0.0), (pad * first * MASKED_SCORE).to(k.dtype).expand(shape)], dim=-1)
    v = torch.cat([v.masked_fill(pad, 0.0), v.new_zeros(shape)], dim=-1)
    return q, k, v


def sharded_attention(q, k, v, parallel_config, key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over the whole sequence from this rank's ``[B, S_local, H, D]`` q/k/v (after RMSNorm and
    RoPE): diffusers' ring or ring × Ulysses template around :func:`attention_with_lse`, the padding masked
    by :func:`pad_keys`. Returns ``[B, S_local, H, D]``."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    head_dim = q.shape[-1]
    if key_padding is not None:
        q, k, v = pad_keys(q, k, v, key_padding)
    out = _templated_context_parallel_attention(
        q,
        k,
        v,
        None,
        0.0,
        False,
        1.0 / math.sqrt(head_dim),
        False,
        False,
        forward_op=attention_with_lse,
        backward_op=_no_backward,
        _parallel_config=parallel_config,
    )
    return out[..., :head_dim]


def split_attention(
    inputs, parallel_config, backend: str, token_counts, rope, key_padding, design: str = "auto"
) -> torch.Tensor:
    """The attention of this rank's tokens (:class:`~srpo_infer.attention.AttentionInputs`, every head)
    over the whole image's: Ulysses (:func:`ulysses_attention`) when the split is Ulysses only, else
    diffusers' ring / ring × Ulysses around the prologue (:func:`sharded_attention`, sdpa only)."""
    if parallel_config.context_parallel_config.ring_degree == 1:
        return ulysses_attention(inputs, parallel_config, token_counts, rope, backend, design)
    q, k, v = (t.transpose(1, 2) for t in attention_prologue(inputs))
    return sharded_attention(q, k, v, parallel_config, key_padding).flatten(2)


def ulysses_attention(
    inputs, parallel_config, token_counts: tuple[int, int], rope, backend: str, design: str = "auto"
) -> torch.Tensor:
    """Ulysses that moves the projections, before RMSNorm and RoPE: each rank then runs ``backend`` (our
    fused kernels, or the reference math) over the whole sequence, in its own order and without the
    padding, for ``heads / ulysses`` heads — exactly what one process computes for those heads (the
    8-bit modes' mean key and V scales included), so the split image equals the whole one bit for bit.

    ``inputs``: this rank's tokens, every head; ``token_counts``: the image's real text and image
    tokens; ``rope``: the whole sequence's (cos, sin). Returns ``[B, S_local, H*D]``.
    """
    from torch.distributed import _functional_collectives as funcol

    config = parallel_config.context_parallel_config
    group, ways = config._ulysses_mesh.get_group(), config.ulysses_degree
    n_txt, n_img = token_counts
    txt_local = -(-n_txt // ways)  # each rank's share of the padded text (diffusers' equal chunks)
    double = inputs.txt_q is not None

    def exchange(x: torch.Tensor) -> torch.Tensor:
        """``[ways, ...]``: chunk r to rank r, chunk r back from rank r."""
        out = funcol.all_to_all_single(x.contiguous().flatten(), None, None, group)
        return _waited(out).view(x.shape)

    # One all-to-all for q, k and v of both streams: this rank's [text, image] tokens × every head →
    # every token × this rank's heads; then each stream in its own order, without the padding.
    if double:
        local = [torch.cat([getattr(inputs, f"txt_{n}"), getattr(inputs, f"img_{n}")], dim=1) for n in "qkv"]
    else:
        local = [getattr(inputs, f"img_{n}") for n in "qkv"]
    x = torch.stack(local)  # [3, B, S_local, H*D]
    three, b, n, width = x.shape
    x = exchange(x.view(three, b, n, ways, width // ways).permute(3, 0, 1, 2, 4)).permute(1, 2, 0, 3, 4)
    txt = x[:, :, :, :txt_local].flatten(2, 3)[:, :, :n_txt]  # [3, B, n_txt, H*D / ways]
    img = x[:, :, :, txt_local:].flatten(2, 3)[:, :, :n_img]
    if double:
        streams = {f"{s}_{n}": t[i] for s, t in (("txt", txt), ("img", img)) for i, n in enumerate("qkv")}
    else:
        streams = {f"img_{n}": torch.cat([txt[i], img[i]], dim=1) for i, n in enumerate("qkv")}
    heads = inputs._replace(**streams, rope_cos=rope[0], rope_sin=rope[1], heads=inputs.heads // ways)
    out = attend(heads, backend, design)  # [B, n_txt + n_img, H*D / ways]
    b, width = out.shape[0], out.shape[-1]
    img_local = inputs.img_q.shape[1] - (0 if double else txt_local)
    txt_out = F.pad(out[:, :n_txt], (0, 0, 0, ways * txt_local - n_txt)).view(b, ways, txt_local, width)
    img_out = F.pad(out[:, n_txt:], (0, 0, 0, ways * img_local - n_img)).view(b, ways, img_local, width)
    back = exchange(torch.cat([txt_out, img_out], dim=2).transpose(0, 1))  # [ways: head groups, B, S_local, w]
    return back.permute(1, 2, 0, 3).flatten(2)


def _waited(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return tensor.wait() if isinstance(tensor, funcol.AsyncCollectiveTensor) else tensor


def attention_with_lse(
    ctx,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    _save_ctx=True,
    _parallel_config=None,
):
    """One shard's attention for diffusers' templates, ``[B, S, H, D]`` in and out; with ``return_lse``
    also the log-sum-exp ``[B, S, H]`` (float32) that ring attention merges shards with."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    elif q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    else:  # flash has no float32; the memory-efficient kernel does and returns the LSE too
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]  # padded to a multiple of 32 queries
    return out.transpose(1, 2), lse.transpose(1, 2).float()


def _no_backward(*_args, **_kwargs):
    raise NotImplementedError("srpo_infer's context-parallel attention is for inference; it has no backward")
