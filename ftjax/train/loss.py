"""Token cross-entropy, dense or chunked over the sequence.

The dense loss materializes float32 logits (batch, seq, vocab): for Llama 3
(vocab 128,256) at 32 x 4096 tokens that is 67 GB, and its gradient as much
again. The chunked loss takes the final hidden states instead (the model's
`return_hidden=True`) and applies the output head to `chunk` positions at a
time inside a `lax.scan` whose body is under `jax.checkpoint`: the forward pass
keeps only the running sums, and the backward pass recomputes one chunk's
logits, turns them into that chunk's gradient and drops them. Peak logits
memory is batch x chunk x vocab x 4 bytes in both passes. The price is one
more head matmul per token in the backward pass (forward, recompute, and the
two gradient matmuls: 4/3 of the dense head's FLOPs).

The batch axis is never split, so data-parallel and FSDP sharding of the
batch holds inside every chunk.

    >>> resolve_loss_chunk(-1, seq_len=512, vocab_size=256)  # tiny model: dense
    0
    >>> resolve_loss_chunk(-1, seq_len=4096, vocab_size=128256)  # Llama 3: chunks
    128
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ftjax.errors import ConfigError

# Auto (`loss_chunk=-1`) chunks the loss when one sequence's float32 logits
# would exceed this many bytes, with chunks of at most this many bytes per row.
AUTO_CHUNK_BYTES = 64 * 2**20


def token_losses(logits, targets, label_smoothing: float = 0.0, z_loss: float = 0.0):
    """Per-token cross-entropy (+ z-loss on log Z) in float32.

    With label smoothing eps the target is (1-eps) one-hot + eps uniform, as
    torch's `CrossEntropyLoss(label_smoothing=eps)`:
    `(1-eps) (log Z - z_t) + eps (log Z - mean_v z_v)`; z-loss adds
    `z_loss * (log Z)^2` (PaLM)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    if label_smoothing:
        uniform = log_z - jnp.mean(logits, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    if z_loss:
        nll = nll + z_loss * jnp.square(log_z)
    return nll


def loss_sums(logits, targets, mask, label_smoothing: float = 0.0, z_loss: float = 0.0):
    """(masked loss sum, masked count of argmax-correct tokens) of dense logits."""
    mask = mask.astype(jnp.float32)
    losses = token_losses(logits, targets, label_smoothing, z_loss)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(correct * mask)


def regression_sums(values, targets, mask):
    """(masked squared-error sum, 0): the MSE loss of a regression head
    (`transformers`' loss for num_labels == 1); there is no accuracy."""
    mask = mask.astype(jnp.float32)
    err = values.astype(jnp.float32) - targets.astype(jnp.float32)
    return jnp.sum(err * err * mask), jnp.zeros((), jnp.float32)


def chunked_loss_sums(
    logits_fn,
    head,
    hidden,
    targets,
    mask,
    *,
    chunk: int,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    rng=None,
):
    """`loss_sums` of `logits_fn(head, hidden, rng)` without ever holding the
    logits of more than `chunk` positions.

    `hidden` (batch, seq, d); `targets`, `mask` (batch, seq); `head` the pytree
    the logits depend on besides `hidden` (the head's weight leaf: gradients
    reach it, and `hidden`, through the scan). A sequence length that `chunk`
    does not divide is padded with masked positions. `rng` (dropout of a LoRA
    head) is folded with the chunk index, so each chunk draws its own mask.
    """
    b, t = targets.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))

    def by_chunk(x):  # (batch, n * chunk, ...) -> (n, batch, chunk, ...)
        return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

    xs = (by_chunk(hidden), by_chunk(targets), by_chunk(mask), jnp.arange(n))

    # Under checkpoint the scan saves only each chunk's inputs (slices of
    # `hidden`, which is kept anyway); the logits are recomputed in the backward
    # pass. prevent_cse is not needed inside a scan.
    @jax.checkpoint
    def body(sums, x):
        h, tgt, m, i = x
        chunk_rng = None if rng is None else jax.random.fold_in(rng, i)
        logits = logits_fn(head, h, chunk_rng)
        loss, correct = loss_sums(logits, tgt, m, label_smoothing, z_loss)
        return (sums[0] + loss, sums[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss, correct), _ = jax.lax.scan(body, (zero, zero), xs)
    return loss, correct


def auto_loss_chunk(seq_len: int, vocab_size: int, budget: int = AUTO_CHUNK_BYTES) -> int:
    """The chunk length `loss_chunk=-1` picks: 0 (dense) when one sequence's
    float32 logits fit in `budget` bytes, else the largest power of two of
    positions whose logits do (a power of two divides the usual lengths)."""
    row = 4 * vocab_size
    if seq_len * row <= budget:
        return 0
    return 1 << max(0, (budget // row).bit_length() - 1)


def resolve_loss_chunk(
    loss_chunk: int, seq_len: int, vocab_size: int, *, supported: bool = True
) -> int:
    """The chunk length to use (0: the dense loss) for `train.loss_chunk`:
    -1 auto (`auto_loss_chunk`), 0 dense, N > 0 chunks of N positions.
    `supported`: whether the model family can return hidden states
    (`FamilySpec.returns_hidden`); auto then stays dense, N > 0 is an error."""
    if loss_chunk < -1:
        raise ConfigError(
            f"train.loss_chunk={loss_chunk}; expected -1 (auto), 0 (dense) or a chunk length > 0"
        )
    if loss_chunk == 0 or (loss_chunk == -1 and not supported):
        return 0
    if not supported:
        raise ConfigError(
            f"train.loss_chunk={loss_chunk}: the model family declares no output head "
            "(FamilySpec.head_kernel / tied_embedding), so the loss can only be dense; "
            "set train.loss_chunk=0 or -1"
        )
    if loss_chunk == -1:
        return auto_loss_chunk(seq_len, vocab_size)
    return min(loss_chunk, seq_len)
