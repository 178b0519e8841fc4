"""The KV caches behind `common.forward`: transformers' `DynamicCache` or a preallocated static one.

`DecodeConfig.kv_cache` picks one; the decoders use only `crop(-n)` ("drop the last n cached
columns"), `batch_select_indices` (finished rows leave), `keep_columns` and the forward itself, so
either serves them.

* `dynamic`: transformers' `DynamicCache`; every call concatenates, `crop` slices.
* `static`: `StaticKV`, transformers' `StaticCache` (gpt-fast's `KVCache`: a per-layer buffer of
  the batch's full length, preallocated on the first call, written in place at explicit
  positions) with one layer change, `PositionedLayer`. transformers' `StaticLayer` already keeps
  its write position as a length pointer (`cumulative_length`, a tensor) and its `crop(-n)` moves
  that pointer back without touching the buffer, which is exactly "drop the unfinished part": the
  next window overwrites it. What it lacks is a batch that shrinks: `StaticLayer` has no
  `batch_select_indices` and returns its whole buffer whatever the call's batch. `PositionedLayer`
  writes rows `[:b]` of the buffer for a call of `b` rows, returns those rows, and compacts the
  rows that stay into the buffer's first rows in place (no new buffer). Keys past the written
  part are stale or zero: the decoder's mask (its key dimension is always the buffer length, see
  `key_mask`) never lets a query see them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from d2f.decoding.config import KV_CACHES


class PositionedLayer(StaticLayer):
    """transformers' `StaticLayer` whose active batch is the call's: rows `[:b]` of the buffer."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        # key_states, value_states: (b, H, W, D), b <= the buffer's batch (the first call's)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, W = key_states.shape[0], key_states.shape[-2]
        pos = torch.arange(W, device=self.device) + self.cumulative_length  # (W,) columns
        self.cumulative_length.add_(W)
        self.keys[:b].index_copy_(2, pos, key_states)
        self.values[:b].index_copy_(2, pos, value_states)
        return self.keys[:b], self.values[:b]  # (b, H, max_cache_len, D)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep rows `indices` (n,) long, moved to the buffer's first n rows (same storage)."""
        if self.is_initialized:
            n = indices.shape[0]
            self.keys[:n] = self.keys[indices]  # the right side is a copy: no aliasing
            self.values[:n] = self.values[indices]

    def seek(self, n: int) -> None:
        """Set the write pointer to column n (the next call writes from there)."""
        self.cumulative_length.fill_(n)


class StaticKV(StaticCache):
    """transformers' `StaticCache` of `max_cache_len` columns made of `PositionedLayer`s."""

    def __init__(self, config, max_cache_len: int):
        super().__init__(config=config, max_cache_len=max_cache_len)
        kinds = {type(layer) for layer in self.layers}
        if kinds != {StaticLayer}:  # sliding-window or hybrid layers: not the models d2f decodes
            raise ValueError(f"kv_cache='static' needs full-attention layers only, got {kinds}")
        self.layers = [PositionedLayer(max_cache_len=max_cache_len) for _ in self.layers]
        self.max_cache_len = max_cache_len

    def seek(self, n: int) -> None:
        for layer in self.layers:
            layer.seek(n)


def make_cache(model, kind: str, length: int, batch: int | None = None) -> DynamicCache | StaticKV:
    """A fresh cache of `kind` ("dynamic" or "static"); `length`: the static buffer's columns.

    With `batch`, a static cache allocates its buffers now, for `batch` rows, in the model's
    dtype and device (transformers' `early_initialization`), instead of in the first call: a
    first call inside a compiled step would otherwise allocate them inside the graph, where
    transformers cannot mark them as static addresses (which CUDA graphs need to mutate them).
    """
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "static":
        cache = StaticKV(model.config, length)
        if batch is not None:
            config = model.config.get_text_config()
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or (
                config.hidden_size // config.num_attention_heads
            )
            weight = next(model.parameters())
            cache.early_initialization(batch, heads, head_dim, weight.dtype, weight.device)
        return cache
    raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kind!r}")


def keep_columns(cache, n: int) -> None:
    """Keep the first `n` cached columns: a pointer move for the static cache (no host sync),
    transformers' `crop` (which takes how many to remove) for the dynamic one."""
    if isinstance(cache, StaticKV):
        cache.seek(n)
        return
    extra = cache.get_seq_length() - n
    if extra > 0:
        cache.crop(-extra)


def key_mask(mask_bool: Tensor, cache) -> Tensor:
    """(B, Q, K) bool over keys `[0, K)` -> (B, Q, max_cache_len) for a static cache (the keys
    past K are not visible); unchanged for any other cache."""
    if not isinstance(cache, StaticKV) or mask_bool.shape[-1] == cache.max_cache_len:
        return mask_bool
    B, Q, K = mask_bool.shape
    if K > cache.max_cache_len:
        raise ValueError(f"mask over {K} keys, static cache of {cache.max_cache_len} columns")
    pad = mask_bool.new_zeros(B, Q, cache.max_cache_len - K)
    return torch.cat([mask_bool, pad], -1)
