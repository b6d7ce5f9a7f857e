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
    def __init__(self, model, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        self.decoder = model.model
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        _, _, self.num_kv_heads, _, self.head_dim = cache.k.shape              # [L, S, Hkv, T, D]

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
        """One token for each of rows 0..num_rows-1, fed from cache.last_tokens; returns logits [B, V]."""
        c = self.cache
        B = num_rows
        Tk = int(c.row_lengths[:B].max()) + 1
        lengths, starts = c.lengths[:B], c.starts[:B]                                        # [B]
        tokens = c.last_tokens[:B, None]                                                     # [B, 1]
        positions = (lengths - starts)[:, None]                                              # [B, 1]
        pos = c.positions[:Tk]
        mask = (pos[None, :] >= starts[:, None]) & (pos[None, :] <= lengths[:, None])        # [B, Tk]
        rows = torch.arange(B, device=c.k.device)
        def write(layer: int, k: torch.Tensor, v: torch.Tensor):
            c.k[layer, rows, :, lengths] = k[:, :, 0]
            c.v[layer, rows, :, lengths] = v[:, :, 0]
            return c.k[layer, :B, :, :Tk].contiguous(), c.v[layer, :B, :, :Tk].contiguous()
        logits = self._forward(tokens, positions, mask[:, None, None, :], write)
        c.advance(B)
        return logits

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, write,
                 all_positions: bool = False) -> torch.Tensor:
        B, T = tokens.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        x = self.decoder.embed_tokens(tokens)                                   # [B, T, C]
        cos, sin = self.decoder.rotary_emb(x, positions)                        # [B, T, D]
        cos, sin = cos[:, None], sin[:, None]                                   # [B, 1, T, D]
        for i, layer in enumerate(self.decoder.layers):
            attn = layer.self_attn
            h = rms_norm(layer.input_layernorm, x)
            if attn.qkv_proj is not None:                                      # fused at load (float weights)
                q, k, v = attn.qkv_proj(h).split([H * D, Hkv * D, Hkv * D], dim=-1)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            q = q.view(B, T, H, D).transpose(1, 2)                              # [B, H, T, D]
            k = k.view(B, T, Hkv, D).transpose(1, 2)                            # [B, Hkv, T, D]
            v = v.view(B, T, Hkv, D).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            k_all, v_all = write(i, k, v)                                       # [B, Hkv, Tk, D]
            if T == 1:
                o = decode_attention(q, k_all, v_all, mask, attn.scaling)       # [B, H, 1, D]
            else:
                o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=attn.scaling,
                                                   enable_gqa=H != Hkv)         # [B, H, T, D]
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, H * D))
            h = rms_norm(layer.post_attention_layernorm, x)
            if layer.mlp.gate_up_proj is not None:
                gate, up = layer.mlp.gate_up_proj(h).chunk(2, dim=-1)
                x = x + layer.mlp.down_proj(F.silu(gate) * up)
            else:
                x = x + layer.mlp(h)
        x = rms_norm(self.decoder.norm, x if all_positions else x[:, -1])       # [B, T, C] or [B, C]
        return self.model.lm_head(x).float()                                    # [B, T, V] or [B, V]
