"""Bytes a training forward leaves alive for its backward, as this repo's model saves them.

The starting point is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): per layer, in 16-bit, s*b*h*(34 + 5*a*s/h) bytes; 10 + 24/t + 5as/(ht)
with tensor parallelism t; 34/t + 5as/(ht) with sequence parallelism too. Our model differs:

- ReLU, not GeLU: ReLU's backward reads its output, which is also fc2's input, so the FFN
  keeps one ffn-wide tensor where GeLU keeps two (-8 of the 34).
- ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels) keeps q, k, v, its
  output and an fp32 log-sum-exp per row, never the s x s scores; ``attention_saves_scores``
  models the math fallback (taken on CPU when attention dropout is on), which does, in fp32.
- Mixed precision is autocast over fp32 weights: the residual stream (embeddings and the
  residual adds) and the LayerNorm outputs stay fp32, and every matmul saves its own 16-bit
  copy of its input, so q, k and v each keep a copy of the same LayerNorm output.
- The PyTorch TP plan keeps the all-gathered LayerNorm output that a column-parallel matmul
  reads (Megatron keeps the shard and gathers again in backward), so with sequence
  parallelism those inputs stay full size; what lies between the sub-layers (LayerNorm
  inputs and statistics, dropout masks) is split by sequence.
- Activation checkpointing wraps each block (opt/parallel/data_parallel.py): ``full`` keeps
  the block's input; ``selective`` keeps the input plus the outputs of every matmul and of
  attention, and recomputes LayerNorm, ReLU, dropout and the adds from them. With the fused
  attention there is no s x s term for it to drop, so it saves far less than in the paper.

Symbols in the comments: ``s`` sequence length, ``b`` micro-batch, ``h`` d_model, ``f``
ffn_dim, ``a`` heads, ``w`` word_embed_dim, ``V`` vocabulary, ``t`` tensor-parallel degree;
``d`` bytes of the compute dtype (2 under bf16/fp16 autocast, 4 in fp32), ``r`` of the
residual stream and LayerNorm outputs (4 in this repo: the weights are fp32; r = d for a
model held in 16-bit, as the paper assumes), ``m`` of a dropout mask (1 on CUDA, whose fused dropout keeps a bool
mask; None means "the dtype of the tensor dropped", which is what CPU dropout keeps).
"""

from __future__ import annotations

from opt.errors import OptError
from opt.models.flops import check_checkpoint_mode
from opt.models.sizes import ModelArgs
from opt.parallel.rules import tensor_parallel_problem

FP32 = 4
# LayerNorm keeps its input and an fp32 mean and rstd per token (fp32 under autocast too).
NORM_STATS_BYTES = 2 * FP32
INDEX_BYTES = 8  # int64 position ids


def activation_bytes_per_layer(
    args: ModelArgs,
    seq_len: int,
    micro_batch: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    checkpoint: str = "none",
    dtype_bytes: int = 2,
    attention_saves_scores: bool = False,
    *,
    residual_bytes: int = 4,
    dropout_mask_bytes: int | None = 1,
) -> int:
    """Bytes one block keeps for backward, for one micro-batch on one TP rank (training mode,
    dropout from ``args``).

    The block's input counts as this block's, so L blocks hold L inputs and the last block's
    output belongs to the head. Not included: the RNG state checkpointing stashes (a few KiB
    per block) and autocast's 16-bit weight copies (``autocast_weight_copy_bytes``).
    """
    _check(args, seq_len, tp, sequence_parallel, checkpoint)
    h, f, a, t = args.d_model, args.ffn_dim, args.n_heads, tp
    d, r = dtype_bytes, residual_bytes
    tokens = seq_len * micro_batch
    # The residual stream on this rank: sequence parallelism splits its tokens over t.
    local_tokens = tokens // t if sequence_parallel else tokens
    block_input = local_tokens * r * h  # what a checkpoint keeps (r*s*b*h, / t with SP)
    if checkpoint == "full":
        return block_input

    heads = micro_batch * a // t  # (batch x head) pairs on this rank
    if checkpoint == "selective":
        saved_matmuls = (
            tokens * d * 3 * h // t  # q, k, v projections
            + tokens * d * 2 * h  # out_proj and fc2 outputs: partial sums, full size under TP
            + tokens * d * f // t  # fc1 output; ReLU is recomputed from it
        )
        if attention_saves_scores:
            # The math backend's two fp32 bmm outputs: raw scores (b*a*s*s) and scores @ v.
            attention = heads * seq_len * seq_len * FP32 + tokens * FP32 * h // t
        else:
            attention = tokens * d * h // t + heads * seq_len * FP32  # output, log-sum-exp
        return block_input + saved_matmuls + attention

    # No recompute. Pre-LN and post-LN keep the same sizes: two LayerNorm inputs (pre-LN:
    # block input and mid-block residual; post-LN: the two residual sums), the inputs of the
    # q/k/v and fc1 matmuls, attention's internals and ReLU's output.
    norms = 2 * local_tokens * (r * h + NORM_STATS_BYTES)
    # Under autocast q, k and v each save their own 16-bit cast of the LayerNorm output (the
    # fp32 output itself is not kept: LayerNorm's backward reads its input and statistics).
    copies = 3 if d != r else 1
    matmul_inputs = tokens * d * h * (copies + 1)  # gathered to full size under SP
    attention_out = tokens * d * h // t  # also out_proj's input
    if attention_saves_scores:
        # Math backend: contiguous fp32 copies of q, k^T and v, and fp32 probabilities
        # (plus, with attention dropout, its mask and the dropped probabilities).
        attention = tokens * FP32 * 3 * h // t + attention_out
        per_score = FP32
        if args.attn_dropout > 0:
            per_score += (FP32 if dropout_mask_bytes is None else dropout_mask_bytes) + FP32
        attention += heads * seq_len * seq_len * per_score
    else:
        # Fused kernel: q, k, v (the projections' outputs), output, fp32 log-sum-exp.
        attention = tokens * d * 3 * h // t + attention_out + heads * seq_len * FP32
    relu_out = tokens * d * f // t  # also fc2's input (fc1's output is freed)
    masks = 0
    if args.dropout > 0:  # on the out_proj and fc2 outputs, in the residual stream's layout
        mask = d if dropout_mask_bytes is None else dropout_mask_bytes
        masks = 2 * local_tokens * mask * h
    return norms + matmul_inputs + attention + relu_out + masks


def embedding_activation_bytes(
    args: ModelArgs,
    seq_len: int,
    micro_batch: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    dtype_bytes: int = 2,
) -> int:
    """What the first pipeline stage keeps before block 0 (whose input is block 0's): the
    position ids, and 350M's project_in input. Token ids are the data loader's, not counted."""
    tokens = seq_len * micro_batch
    local_tokens = tokens // tp if sequence_parallel else tokens
    positions = seq_len * INDEX_BYTES
    project_in = local_tokens * dtype_bytes * args.word_embed_dim if args.projects_embeddings else 0
    return positions + project_in


def head_activation_bytes(
    args: ModelArgs,
    seq_len: int,
    micro_batch: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    dtype_bytes: int = 2,
    *,
    residual_bytes: int = 4,
) -> int:
    """What the last pipeline stage keeps after the last block, the loss included: the final
    LayerNorm's input (pre-LN), the head matmuls' inputs, the logits (the trainer holds them
    through backward) and the fp32 log-probabilities cross-entropy saves; under TP the last
    two are split by vocabulary (loss_parallel). Targets are the data loader's, not counted."""
    h, w, t = args.d_model, args.word_embed_dim, tp
    d = dtype_bytes
    tokens = seq_len * micro_batch
    local_tokens = tokens // t if sequence_parallel else tokens
    total = 0
    if args.pre_norm:
        total += local_tokens * (residual_bytes * h + NORM_STATS_BYTES)
    if args.projects_embeddings:
        # project_out is replicated: its input (the last hidden state) stays sequence-split.
        total += local_tokens * d * h
    # The tied head's input, gathered to full size under SP: w wide (= h without projection).
    total += tokens * d * w
    vocab = args.vocab_size // t
    return total + tokens * vocab * (d + FP32)  # logits, log-softmax output (fp32)


def activation_bytes(
    args: ModelArgs,
    seq_len: int,
    micro_batch: int,
    tp: int = 1,
    sequence_parallel: bool = False,
    checkpoint: str = "none",
    dtype_bytes: int = 2,
    layers: int | None = None,
    attention_saves_scores: bool = False,
    *,
    embedding: bool = True,
    head: bool = True,
    residual_bytes: int = 4,
    dropout_mask_bytes: int | None = 1,
) -> int:
    """Bytes one micro-batch keeps for backward on a rank holding ``layers`` blocks (default:
    all), plus the embedding's and the head's and loss's when this rank holds them (the first
    and last pipeline stage). Add ``autocast_weight_copy_bytes`` under mixed precision."""
    layers = args.n_layers if layers is None else layers
    per_layer = activation_bytes_per_layer(
        args,
        seq_len,
        micro_batch,
        tp,
        sequence_parallel,
        checkpoint,
        dtype_bytes,
        attention_saves_scores,
        residual_bytes=residual_bytes,
        dropout_mask_bytes=dropout_mask_bytes,
    )
    total = layers * per_layer
    if embedding:
        total += embedding_activation_bytes(
            args, seq_len, micro_batch, tp, sequence_parallel, dtype_bytes
        )
    if head:
        total += head_activation_bytes(
            args,
            seq_len,
            micro_batch,
            tp,
            sequence_parallel,
            dtype_bytes,
            residual_bytes=residual_bytes,
        )
    return total


def autocast_weight_copy_bytes(
    args: ModelArgs,
    tp: int = 1,
    checkpoint: str = "none",
    dtype_bytes: int = 2,
    layers: int | None = None,
    *,
    embedding: bool = True,
    head: bool = True,
    autocast_spans_step: bool = False,
) -> int:
    """16-bit copies of the fp32 weights that autocast makes and the matmuls save for
    backward: weight-sized, not token-sized, and held once per forward whatever the batch.

    Checkpointed blocks drop theirs (the cast is recomputed), and biases are cast but not
    saved, unless the autocast region is still open: its cache keeps every cast of a
    parameter until it closes. The trainer closes it after each micro-batch's forward,
    except under pipeline parallelism, where it spans the whole schedule
    (``autocast_spans_step``): then every block's weights and biases stay copied, checkpoint
    or not. 0 in fp32.
    """
    if dtype_bytes >= FP32:
        return 0
    check_checkpoint_mode(checkpoint)
    layers = args.n_layers if layers is None else layers
    h, f, w = args.d_model, args.ffn_dim, args.word_embed_dim
    projection = h * w if args.projects_embeddings else 0  # replicated under TP
    block_weights = 4 * h * h + 2 * h * f  # q, k, v, out_proj, fc1, fc2
    elements = 0
    if autocast_spans_step:
        # Biases too; out_proj's and fc2's are replicated under TP, the others split.
        elements += layers * ((block_weights + 3 * h + f) // tp + 2 * h)
    elif checkpoint == "none":
        elements += layers * block_weights // tp
    if embedding:
        elements += projection  # project_in (the embedding lookup is not autocast)
    if head:
        elements += projection + args.vocab_size * w // tp  # project_out, tied head
    return elements * dtype_bytes


def _check(
    args: ModelArgs, seq_len: int, tp: int, sequence_parallel: bool, checkpoint: str
) -> None:
    check_checkpoint_mode(checkpoint)
    if (problem := tensor_parallel_problem(args, tp)) is not None:
        raise OptError(problem)
    if sequence_parallel and seq_len % tp:
        raise OptError(f"sequence parallelism needs tp={tp} to divide seq_len={seq_len}")
