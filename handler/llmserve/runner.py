"""Runs the model over the KV cache: batched prefill of new sequences (left padded) and one
batched decode step for all running ones. Reuses the Hugging Face modules (so quantized linear
layers work unchanged) but owns attention and the cache, so sequences join and leave freely.
Knows nothing about requests, sampling or scheduling."""

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .quantize import prefill_packed_rows


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B, 1, T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm as one fused op (Hugging Face's takes seven)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def decode_attention(q: torch.Tensor, k_past: torch.Tensor, k_new: torch.Tensor, v_past: torch.Tensor,
                     v_new: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention for a few new tokens per sequence (one when decoding, a draft's when verifying),
    query heads grouped over their shared KV head. Plain matrix products: on the CPU,
    scaled_dot_product_attention's flash kernel is several times slower than this for a single
    query in bf16. The cached and the new keys and values are taken apart, never concatenated:
    a concatenation copied every row's whole context in every layer, each step. q: [B, H, W, D];
    k_past, v_past: [B, Hkv, Tk, D] (views into the cache); k_new, v_new: [B, Hkv, W, D];
    mask: [B, 1, W, Tk+W]."""
    B, H, W, D = q.shape
    Hkv, Tk = k_past.shape[1], k_past.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv * W, D)                                     # [B, Hkv, G*W, D]
    scores = torch.cat([torch.matmul(qg, k_past.transpose(-1, -2)), torch.matmul(qg, k_new.transpose(-1, -2))],
                       dim=-1).float() * scale                                   # [B, Hkv, G*W, Tk+W]
    scores = scores.view(B, Hkv, H // Hkv, W, -1).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v_new.dtype).flatten(2, 3)        # [B, Hkv, G*W, Tk+W]
    o = torch.matmul(probs[..., :Tk], v_past) + torch.matmul(probs[..., Tk:], v_new)
    return o.reshape(B, H, W, D)


class ModelRunner:
    def __init__(self, model, cache: KVCache, compile_max_rows: int = 0, fuse: bool = False) -> None:
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
        # fuse: where every projection takes our 4-bit kernel, every decode step runs our C++ decoder
        # step instead, its products packed or float as the layers choose (max_packed_rows)
        self.fused_weights = self._fused_weights() if fuse else None
        if self.compile_max_rows and self.fused_weights is None:
            # sizes that merely coincide must not be taken for equal (a context of 3 is not the
            # number of KV heads): without duck sizing the warm-up's sizes cannot leak into guards
            torch.fx.experimental._config.use_duck_shape = False
            # one graph serves every layer (they differ only in weights, which are not guarded on:
            # they never change after start-up); batch and context sizes are symbolic
            self.compiled_layer = torch.compile(self._decode_layer, dynamic=True, options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def warm_up(self, draft_tokens: int = 0) -> int:
        """Compile now, not in a user's request: a decode step on empty rows at batch 1, 2, 4, ...
        up to compile_max_rows (batch 1 gets a graph of its own, and a kernel may split the range
        again: on an AVX2 EPYC int4 steps of 2-16 and 17-32 rows took two), and with draft_tokens
        a verify step of that many drafted tokens at each batch whose rows stay within it. Leaves
        the cache empty; returns how many graphs it built (0 when nothing is compiled)."""
        c = self.cache
        n = self.compile_max_rows
        before = self.compiled_graphs()
        for W in sorted({1, 1 + draft_tokens}):
            for B in sorted({min(2 ** i, n // W) for i in range(n.bit_length() + 1)} - {0}):
                c.set_prefilled(slice(0, B), 2, torch.zeros(B, dtype=torch.long, device=c.k.device))
                self.verify(torch.zeros(B, W, dtype=torch.long, device=c.k.device))
                c.set_prefilled(slice(0, B), 0, torch.zeros(B, dtype=torch.long, device=c.k.device))
        return self.compiled_graphs() - before

    @staticmethod
    def fusable(model) -> bool:
        """Whether llmserve::decode_layers (lowbit_avx2.cpp) can run the model's layers: every
        projection on our 4-bit kernel, fused, without a bias, SiLU; on the CPU."""
        if model.config.hidden_act != "silu":
            return False
        for layer in model.model.layers:
            qkv, o = layer.self_attn.qkv_proj, layer.self_attn.o_proj
            gate_up, down = layer.mlp.gate_up_proj, layer.mlp.down_proj
            if not all(getattr(m, "own_kernel", False) and m.bits == 4 and m.bias is None for m in (qkv, o, gate_up, down)):
                return False
        return True

    def _fused_weights(self) -> list[torch.Tensor] | None:
        """llmserve::decode_layers' weights, or None where it cannot run the model (fusable) or the
        cache is not fp32 or fp16 on the CPU."""
        c = self.cache
        if c.k.dtype not in (torch.float32, torch.float16) or c.k.device.type != "cpu" or not self.fusable(self.model):
            return None
        weights = []
        for layer in self.decoder.layers:
            qkv, o = layer.self_attn.qkv_proj, layer.self_attn.o_proj
            gate_up, down = layer.mlp.gate_up_proj, layer.mlp.down_proj
            dense = [m.weight if m.dense_packed is None else m.dense_packed for m in (qkv, o, gate_up, down)]
            weights += [layer.input_layernorm.weight, qkv.packed, qkv.scales, dense[0], o.packed, o.scales, dense[1],
                        layer.post_attention_layernorm.weight, gate_up.packed, gate_up.scales, dense[2],
                        down.packed, down.scales, dense[3]]
        return weights

    @staticmethod
    def compiled_graphs() -> int:
        """Graphs torch.compile has built in this process (a recompilation storm shows here)."""
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"]

    @torch.inference_mode()
    def prefill(self, rows: slice, token_lists: list[list[int]], all_positions: bool = False,
                num_cached: list[int] | None = None) -> torch.Tensor:
        """Prefill rows[i] with token_lists[i] (left padded to one length T); logits of each last
        token [B, V], or of every position [B, T, V] (perplexity through the engine's own forward).
        num_cached[i]: that many leading tokens' keys and values are in the row already (cache
        positions from its padding on): only the last W positions are computed, W the longest
        uncached tail (a shorter tail's row recomputes a few cached tokens, to the same values);
        our C++ decoder step computes each row's uncached tail alone, no padding (where that keeps
        the padded prefill's kernels: quantize.prefill_packed_rows chooses them by rows)."""
        c = self.cache
        dev = c.k.device
        B, T = len(token_lists), max(len(t) for t in token_lists)
        counts = [len(t) - n for t, n in zip(token_lists, num_cached or [0] * B)]   # uncached tails
        W = max(counts)
        assert T <= c.max_len and rows.stop - rows.start == B and 0 < W <= T and (W == T or not all_positions)
        pads = torch.tensor([T - len(t) for t in token_lists], device=dev)                  # [B]
        tokens = torch.tensor([[0] * (T - len(t)) + t for t in token_lists], device=dev)[:, T - W:]   # [B, W]
        pos, qpos = c.positions[:T], c.positions[T - W:T]
        positions = (qpos[None, :] - pads[:, None]).clamp(min=0)                             # [B, W]
        if self.fused_weights is None:
            causal = qpos[None, :, None] >= pos[None, None, :]                               # [1, W(q), T(k)]
            mask = causal & (pos[None, None, :] >= pads[:, None, None])                      # [B, W, T]
            mask |= qpos[:, None] == pos[None, :]    # padding queries see themselves: no NaN rows
            def write(layer: int, k: torch.Tensor, v: torch.Tensor):
                c.k[layer, rows, :, T - W:T] = k
                c.v[layer, rows, :, T - W:T] = v
                return c.k[layer, rows, :, :T], c.v[layer, rows, :, :T]
            logits = self._forward(tokens, positions, mask[:, None], write, all_positions)
        elif all_positions or self._prefill_packed_rows(sum(counts), W) != self._prefill_packed_rows(B * W, W):
            # our C++ decoder step, each row's W tokens at once, written into the rows' cache (and so
            # the kernels the padded layers take, for all positions or where fewer rows would change them)
            x, cos, sin = self._embed(tokens, positions)
            x = self._fused_layers(x, cos, sin, c.k[:, rows], c.v[:, rows], pads, torch.full_like(pads, T - W),
                                   self._prefill_packed_rows(B * W, W), W=W)
            x = x.reshape(B, W, -1)
            logits = self._logits(x if all_positions else x[:, -1])
        else:   # ... each row's uncached tail alone (no padding: the rows' tokens one after another)
            at = [range(len(t) - n, len(t)) for t, n in zip(token_lists, counts)]           # each tail's positions
            ids = torch.tensor([[t[p] for t, ps in zip(token_lists, at) for p in ps]], device=dev)   # [1, R]
            x, cos, sin = self._embed(ids, torch.tensor([[p for ps in at for p in ps]], device=dev))
            num_new = torch.tensor(counts, device=dev)
            x = self._fused_layers(x, cos, sin, c.k[:, rows], c.v[:, rows], pads, T - num_new,
                                   self._prefill_packed_rows(sum(counts), W), counts=num_new)
            logits = self._logits(x[num_new.cumsum(0) - 1])
        c.set_prefilled(rows, T, pads)
        return logits

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple:
        """tokens, positions [B, W] -> the embedded tokens [B*W, 1, C] and their rotary cos, sin [B*W, 1, D]."""
        x = self.decoder.embed_tokens(tokens.reshape(-1, 1))
        return x, *self.decoder.rotary_emb(x, positions.reshape(-1, 1))

    def _prefill_packed_rows(self, rows: int, longest: int) -> int:
        """The packed-kernel row limit of a prefill of `rows` tokens in all, at most `longest` a row:
        one token a row is a decode step's, else quantize.prefill_packed_rows."""
        packed_rows = self.decoder.layers[0].self_attn.qkv_proj.max_packed_rows
        return packed_rows if longest == 1 else prefill_packed_rows(packed_rows, rows)

    def _fused_layers(self, x, cos, sin, k, v, starts, lengths, max_packed_rows: int, W: int = 0,
                      counts: torch.Tensor | None = None) -> torch.Tensor:
        """Every decoder layer in our C++ step (llmserve::decode_layers) over the R embedded tokens x
        [..., C] (rows of W tokens each, or counts[b] tokens in row b), writing the new keys and values
        into k, v (the cache's rows 0..B-1); the last layer's output [R, C]."""
        first = self.decoder.layers[0]
        x, cos, sin = (t.reshape(-1, t.shape[-1]) for t in (x, cos, sin))
        counts = torch.empty(0, dtype=torch.long) if counts is None else counts
        return torch.ops.llmserve.decode_layers(
            x, cos, sin, k, v, starts, lengths, counts, W, self.num_heads,
            first.input_layernorm.variance_epsilon, first.self_attn.scaling, max_packed_rows, self.fused_weights)

    def _logits(self, x: torch.Tensor, heads: list[str] | None = None) -> torch.Tensor:
        """The final norm and the LM head: logits [B, ..., V] float32 of hidden states [B, ..., C].
        heads [B], each row's Request.lm_head: "top" where nothing but the row's largest logits are
        read (an 8-bit LM head may then compute exactly there only: top()), "rounded" for a sampled
        row (bf16 activations: rounded()), "exact" (or heads None) forward's product."""
        h = rms_norm(self.decoder.norm, x)
        head = self.model.lm_head
        if not hasattr(head, "top"):          # not an 8-bit PackedLinear: one product for every row
            return head(h).float()
        products = {"top": head.top, "rounded": head.rounded, "exact": head}
        kinds = sorted(set(heads or ["exact"]))
        if len(kinds) == 1:
            return products[kinds[0]](h).float()
        logits = torch.empty(*h.shape[:-1], head.out_features, device=h.device)         # [B, ..., V]
        for kind in kinds:
            rows = torch.tensor([k == kind for k in heads], device=h.device)             # [B]
            logits[rows] = products[kind](h[rows]).float()
        return logits

    def decode(self, num_rows: int, heads: list[str] | None = None) -> torch.Tensor:
        """One token for each of rows 0..num_rows-1, fed from cache.last_tokens; returns logits [B, V]."""
        return self.verify(self.cache.last_tokens[:num_rows, None], heads)[:, 0]

    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor, heads: list[str] | None = None) -> torch.Tensor:
        """Rows 0..B-1 each take the W tokens of tokens [B, W] at once: their last token, then a
        draft (speculative decoding; W = 1 is a decode step). Returns logits at every position
        [B, W, V] (heads: see _logits); writes all W keys and values and advances each row by
        one: the engine advances rows further by the draft tokens it keeps (keys past a row's length
        are masked, later overwritten). The linear layers see the B x W tokens as that many rows (the kernel for that
        many rows, the same per row as in a one-token step), attention sees each row's W. The
        layers read the cache and return their new keys and values, written after the last layer
        in one go: a layer is then a pure function of tensors, which torch.compile can fuse. Our C++
        decoder step (fused_weights) takes all layers in one call and writes the cache itself."""
        c = self.cache
        B, W = tokens.shape
        dev = c.k.device
        # cached positions, at least 2 (the second masked): a size of 1 would get a compiled graph of its own
        Tk = max(int(c.row_lengths[:B].max()), 2)
        assert Tk + W <= c.max_len
        lengths, starts = c.lengths[:B], c.starts[:B]                                        # [B]
        offsets = torch.arange(W, device=dev)
        x, cos, sin = self._embed(tokens, (lengths - starts)[:, None] + offsets)             # [B*W, 1, C|D]
        if self.fused_weights is not None:   # writes the cache itself
            x = self._fused_layers(x, cos, sin, c.k, c.v, starts, lengths,
                                   self.decoder.layers[0].self_attn.qkv_proj.max_packed_rows, W=W)
        else:
            cos, sin = cos[:, None], sin[:, None]                                            # [B*W, 1, 1, D]
            pos = c.positions[:Tk]
            past = (pos[None, :] >= starts[:, None]) & (pos[None, :] < lengths[:, None])       # [B, Tk]
            causal = torch.ones(W, W, dtype=torch.bool, device=dev).tril()                   # [W(q), W(k)]
            mask = torch.cat([past[:, None, :].expand(B, W, Tk), causal.expand(B, W, W)], dim=-1)[:, None]   # [B, 1, W, Tk+W]
            new_k, new_v = [], []
            layer_fn = self.compiled_layer if B * W <= self.compile_max_rows else self._decode_layer
            for i, layer in enumerate(self.decoder.layers):
                x, k, v = layer_fn(layer, x, cos, sin, mask, c.k[i, :B, :, :Tk], c.v[i, :B, :, :Tk])
                new_k.append(k)
                new_v.append(v)
            rows, cols = torch.arange(B, device=dev)[:, None], lengths[:, None] + offsets        # [B, 1], [B, W]
            c.k[:, rows, :, cols] = torch.stack(new_k, dim=1).permute(0, 3, 1, 2, 4)             # [B, W, L, Hkv, D]
            c.v[:, rows, :, cols] = torch.stack(new_v, dim=1).permute(0, 3, 1, 2, 4)
        c.advance(B)
        return self._logits(x.reshape(B, W, -1), heads)                               # [B, W, V]

    def _decode_layer(self, layer, x, cos, sin, mask, k_past, v_past):
        """One decoder layer for W new tokens in each of B rows, flattened: x [B*W, 1, C]; cos, sin:
        [B*W, 1, 1, D]; mask: [B, 1, W, Tk+W] (the last W positions are the new tokens); k_past,
        v_past: [B, Hkv, Tk, D]. Returns the layer's output [B*W, 1, C] and the new tokens' keys and
        values [B, Hkv, W, D]."""
        B, _, W, _ = mask.shape
        q, k, v = self._qkv(layer, x, cos, sin)                                  # [B*W, H|Hkv, 1, D]
        q, k, v = (t.reshape(B, W, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))   # [B, H|Hkv, W, D]
        o = decode_attention(q, k_past, k, v_past, v, mask, layer.self_attn.scaling)   # [B, H, W, D]
        o = o.transpose(1, 2).reshape(B * W, 1, self.num_heads, self.head_dim).transpose(1, 2)   # [B*W, H, 1, D]
        return self._finish_layer(layer, x, o), k, v

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
        return self._logits(x if all_positions else x[:, -1])                   # [B, T, V] or [B, V]
