"""Runs the model over the KV cache: batched prefill of new sequences (left padded) and one
batched decode step for all running ones. Reuses the Hugging Face modules (so quantized linear
layers work unchanged) but owns attention and the cache, so sequences join and leave freely.
Knows nothing about requests, sampling or scheduling."""

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B, 1, T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one fused op (Hugging Face's takes seven)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention for one new token per sequence, query heads grouped over their shared KV head.
    Plain matrix products: on the CPU, scaled_dot_product_attention's flash kernel is several
    times slower than this for a single query in bf16."""
    B, H, _, D = q.shape                                                        # q: [B, H, 1, D]
    Hkv = k.shape[1]
    qg = q.reshape(B, Hkv, H // Hkv, D)                                         # [B, Hkv, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale              # [B, Hkv, G, Tk]
    scores = scores.masked_fill(~mask, float("-inf"))                           # mask: [B, 1, 1, Tk]
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, H, 1, D)


class ModelRunner:
    def __init__(self, model, cache: KVCache, compile_max_rows: int = 0) -> None:
        self.model = model
        self.cache = cache
        self.decoder = model.model
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        _, _, self.num_kv_heads, _, self.head_dim = cache.k.shape              # [L, S, Hkv, T, D]
        # decode steps of at most compile_max_rows rows run their layers through torch.compile:
        # the steps bound by per-op overhead (few rows, packed kernels); larger ones run eagerly
        self.compile_max_rows = min(compile_max_rows, cache.k.shape[1])
        self.compiled_layer = self._decode_layer
        if self.compile_max_rows:
            # sizes that merely coincide must not be taken for equal (a context of 3 is not the
            # number of KV heads): without duck sizing the warm-up's sizes cannot leak into guards
            torch.fx.experimental._config.use_duck_shape = False
            # one graph serves every layer (they differ only in weights, which are not guarded on:
            # they never change after start-up); batch and context sizes are symbolic
            self.compiled_layer = torch.compile(self._decode_layer, dynamic=True, options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def warm_up(self) -> int:
        """Compile now, not in a user's request: a decode step on empty rows at batch 1, 2, 4, ...
        up to compile_max_rows (batch 1 gets a graph of its own, and a kernel may split the range
        again: on an AVX2 EPYC int4 steps of 2-16 and 17-32 rows took two). Leaves the cache
        empty; returns how many graphs it built (0 when nothing is compiled)."""
        c = self.cache
        n = self.compile_max_rows
        before = self.compiled_graphs()
        for B in sorted({min(2 ** i, n) for i in range(n.bit_length() + 1)} - {0}):
            c.set_prefilled(slice(0, B), 2, torch.zeros(B, dtype=torch.long, device=c.k.device))
            self.decode(B)
            c.set_prefilled(slice(0, B), 0, torch.zeros(B, dtype=torch.long, device=c.k.device))
        return self.compiled_graphs() - before

    @staticmethod
    def compiled_graphs() -> int:
        """Graphs torch.compile has built in this process (a recompilation storm shows here)."""
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"]

    @torch.inference_mode()
    def prefill(self, rows: slice, token_lists: list[list[int]], all_positions: bool = False) -> torch.Tensor:
        """Prefill rows[i] with token_lists[i] (left padded to one length); logits of each last
        token [B, V], or of every position [B, T, V] (perplexity through the engine's own forward)."""
        c = self.cache
        dev = c.k.device
        B, T = len(token_lists), max(len(t) for t in token_lists)
        assert T <= c.max_len and rows.stop - rows.start == B
        pads = torch.tensor([T - len(t) for t in token_lists], device=dev)                  # [B]
        tokens = torch.tensor([[0] * (T - len(t)) + t for t in token_lists], device=dev)    # [B, T]
        pos = c.positions[:T]
        positions = (pos[None, :] - pads[:, None]).clamp(min=0)                              # [B, T]
        causal = pos[None, :, None] >= pos[None, None, :]                                    # [1, T(q), T(k)]
        mask = causal & (pos[None, None, :] >= pads[:, None, None])                          # [B, T, T]
        mask |= torch.eye(T, dtype=torch.bool, device=dev)   # padding queries see themselves: no NaN rows
        def write(layer: int, k: torch.Tensor, v: torch.Tensor):
            c.k[layer, rows, :, :T] = k
            c.v[layer, rows, :, :T] = v
            return c.k[layer, rows, :, :T], c.v[layer, rows, :, :T]
        logits = self._forward(tokens, positions, mask[:, None], write, all_positions)
        c.set_prefilled(rows, T, pads)
        return logits

    @torch.inference_mode()
    def decode(self, num_rows: int) -> torch.Tensor:
        """One token for each of rows 0..num_rows-1, fed from cache.last_tokens; returns logits [B, V].
        The layers read the cache and return their new keys and values, written after the last
        layer in one go: a layer is then a pure function of tensors, which torch.compile can fuse."""
        c = self.cache
        B = num_rows
        # cached positions, at least 2 (the second masked): a size of 1 would get a compiled graph of its own
        Tk = max(int(c.row_lengths[:B].max()), 2)
        lengths, starts = c.lengths[:B], c.starts[:B]                                        # [B]
        pos = c.positions[:Tk + 1]
        mask = (pos[None, :] >= starts[:, None]) & ((pos[None, :] < lengths[:, None]) | (pos[None, :] == Tk))
        mask = mask[:, None, None]                                                           # [B, 1, 1, Tk+1]
        x = self.decoder.embed_tokens(c.last_tokens[:B, None])                               # [B, 1, C]
        cos, sin = self.decoder.rotary_emb(x, (lengths - starts)[:, None])                   # [B, 1, D]
        cos, sin = cos[:, None], sin[:, None]                                                # [B, 1, 1, D]
        new_k, new_v = [], []
        decode_layer = self.compiled_layer if B <= self.compile_max_rows else self._decode_layer
        for i, layer in enumerate(self.decoder.layers):
            x, k, v = decode_layer(layer, x, cos, sin, mask, c.k[i, :B, :, :Tk], c.v[i, :B, :, :Tk])
            new_k.append(k)
            new_v.append(v)
        rows = torch.arange(B, device=c.k.device)
        c.k[:, rows, :, lengths] = torch.stack(new_k, dim=1)                                 # [B, L, Hkv, D]
        c.v[:, rows, :, lengths] = torch.stack(new_v, dim=1)
        c.advance(B)
        return self.model.lm_head(rms_norm(self.decoder.norm, x[:, 0])).float()             # [B, V]

    def _decode_layer(self, layer, x, cos, sin, mask, k_past, v_past):
        """One decoder layer for one new token per row. x: [B, 1, C]; cos, sin: [B, 1, 1, D];
        mask: [B, 1, 1, Tk+1] (the last position is the new token); k_past, v_past: [B, Hkv, Tk, D].
        Returns the layer's output and the new token's keys and values [B, Hkv, D]."""
        q, k, v = self._qkv(layer, x, cos, sin)                                  # [B, H|Hkv, 1, D]
        k_all, v_all = torch.cat([k_past, k], dim=2), torch.cat([v_past, v], dim=2)
        o = decode_attention(q, k_all, v_all, mask, layer.self_attn.scaling)      # [B, H, 1, D]
        return self._finish_layer(layer, x, o), k[:, :, 0], v[:, :, 0]

    def _qkv(self, layer, x, cos, sin):
        """The layer's input norm, projections and rotary embedding: q [B, H, T, D], k and v [B, Hkv, T, D]."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        attn = layer.self_attn
        h = rms_norm(layer.input_layernorm, x)
        if attn.qkv_proj is not None:                                           # fused at load (float weights)
            q, k, v = attn.qkv_proj(h).split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, Hkv, D).transpose(1, 2)
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _finish_layer(self, layer, x, o):
        """Attention output o [B, H, T, D] through o_proj and the MLP, with both residuals."""
        B, _, T, _ = o.shape
        x = x + layer.self_attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
        h = rms_norm(layer.post_attention_layernorm, x)
        if layer.mlp.gate_up_proj is not None:
            gate, up = layer.mlp.gate_up_proj(h).chunk(2, dim=-1)
            return x + layer.mlp.down_proj(F.silu(gate) * up)
        return x + layer.mlp(h)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, write,
                 all_positions: bool = False) -> torch.Tensor:
        """Prefill's forward: every layer writes its keys and values into the cache, then attends."""
        x = self.decoder.embed_tokens(tokens)                                   # [B, T, C]
        cos, sin = self.decoder.rotary_emb(x, positions)                        # [B, T, D]
        cos, sin = cos[:, None], sin[:, None]                                   # [B, 1, T, D]
        for i, layer in enumerate(self.decoder.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            k_all, v_all = write(i, k, v)                                       # [B, Hkv, Tk, D]
            o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=layer.self_attn.scaling,
                                               enable_gqa=self.num_heads != self.num_kv_heads)   # [B, H, T, D]
            x = self._finish_layer(layer, x, o)
        x = rms_norm(self.decoder.norm, x if all_positions else x[:, -1])       # [B, T, C] or [B, C]
        return self.model.lm_head(x).float()                                    # [B, T, V] or [B, V]
