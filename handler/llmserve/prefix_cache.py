"""Prefix caching: the keys and values of prompts' leading token blocks, kept after their prefill so
a later prompt that starts with the same blocks copies them into its KV row instead of computing
them again. A block is BLOCK tokens; it is found by a hash of its token ids and of the block before
it (so a block is reused only after the same whole prefix), and its tokens and parent are compared
on a hit (a hash collision is a miss, never stale keys). The store holds max_tokens at most, its
least recently used blocks evicted first; a hit refreshes its blocks deepest first, so a shared
prefix outlives the tails hung on it. Keys are stored after the rotary embedding, which depends on
the token's position in its sequence, not in the row: a block fits any row at the same position."""

from collections import OrderedDict

import torch

from .config import PREFIX_BLOCK as BLOCK
from .kv_cache import KVCache, zeros


class PrefixCache:
    def __init__(self, cache: KVCache, max_tokens: int) -> None:
        num_layers, _, num_kv_heads, _, head_dim = cache.k.shape                # [L, S, Hkv, T, D]
        num_blocks = max_tokens // BLOCK
        shape = (num_blocks, num_layers, num_kv_heads, BLOCK, head_dim)         # [N, L, Hkv, BLOCK, D]
        self.k = zeros(shape, cache.k.dtype, cache.k.device)
        self.v = zeros(shape, cache.k.dtype, cache.k.device)
        self.cache = cache
        self.blocks: OrderedDict[int, tuple[int, tuple, int]] = OrderedDict()  # key -> (slot, tokens, parent key)
        self.free = list(range(num_blocks - 1, -1, -1))

    def match(self, tokens: list[int]) -> list[int]:
        """Keys of the stored blocks that start `tokens`, first to last, leaving at least one token
        to compute (its logits give the next token)."""
        keys = []
        for key, _, _ in self._chain(tokens, (len(tokens) - 1) // BLOCK):
            if key not in self.blocks:
                break
            keys.append(key)
        return keys

    def load(self, keys: list[int], row: int, start: int) -> None:
        """Copy these blocks into the KV row from cache position start on, and mark them used."""
        self.touch(keys)
        if not keys:
            return
        index = torch.tensor([self.blocks[key][0] for key in keys], device=self.k.device)
        n = len(keys) * BLOCK
        for pool, rows in ((self.k, self.cache.k), (self.v, self.cache.v)):
            dst = rows[:, row, :, start:start + n]                               # [L, Hkv, n, D]
            dst.unflatten(2, (len(keys), BLOCK)).copy_(pool[index].permute(1, 2, 0, 3, 4))

    def save(self, tokens: list[int], row: int, start: int) -> None:
        """Keep the full blocks of `tokens`, prefilled in the KV row from cache position start on,
        that are not stored yet."""
        keys = []
        for i, (key, block, parent) in enumerate(self._chain(tokens, len(tokens) // BLOCK)):
            if key in self.blocks:
                self.blocks.move_to_end(key)            # not evicted by this chain's own new blocks
            else:
                slot = self._allocate()
                if slot is None:
                    break
                span = slice(start + i * BLOCK, start + (i + 1) * BLOCK)
                self.k[slot] = self.cache.k[:, row, :, span]
                self.v[slot] = self.cache.v[:, row, :, span]
                self.blocks[key] = (slot, block, parent)
            keys.append(key)
        self.touch(keys)

    def touch(self, keys: list[int]) -> None:
        """Mark a chain of blocks used now, deepest first: its root is evicted last."""
        for key in reversed(keys):
            self.blocks.move_to_end(key)

    def _chain(self, tokens: list[int], num_blocks: int):
        """(key, block, parent key) of the first num_blocks blocks of tokens, each keyed after the
        one before it; ends early at a block whose key another block holds (a hash collision)."""
        parent = 0
        for i in range(num_blocks):
            block = tuple(tokens[i * BLOCK:(i + 1) * BLOCK])
            key = hash((parent, block))
            entry = self.blocks.get(key)
            if entry is not None and (entry[1] != block or entry[2] != parent):
                return
            yield key, block, parent
            parent = key

    def _allocate(self) -> int | None:
        if not self.free and self.blocks:
            self.free.append(self.blocks.popitem(last=False)[1][0])
        return self.free.pop() if self.free else None
