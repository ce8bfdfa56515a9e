"""A tiny R2Gen (Chen et al., 2020): radiograph in, findings report out.

    image -> VisualExtractor (a small CNN) -> patch features (8x8 patches)
          -> transformer encoder
    report tokens -> embedding -> transformer decoder, whose every layer norm is a
          memory-driven conditional layer norm (MCLN): its scale and shift are computed
          from a relational memory (RM) that is updated token by token, so what the
          decoder has written so far (the report's pattern) conditions how it writes next

The relational memory holds `slots` vectors. At each position it attends over itself and
the current token's embedding, passes that through an MLP, and is updated through input
and forget gates (R2Gen's equations 1-4); position t's layer norms read the memory after
token t. Training is teacher forcing; decoding is greedy or beam search (beam 3, as R2Gen),
both carrying the memory along the sequence.
"""

from __future__ import annotations

import torch
from torch import nn

PAD, BOS, EOS = 0, 1, 2


class VisualExtractor(nn.Module):
    """64x64 grey image in [0, 1] -> (batch, 64 patches, d) features. GroupNorm after each
    convolution: without it the decoder learned the reports' language long before it
    learned to read the image (clinical F1 still 0 after 600 steps)."""

    def __init__(self, d: int) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout),
                    nn.GELU()]

        self.net = nn.Sequential(*block(1, 32), *block(32, 64), *block(64, d))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 4.0 - 2.0).flatten(2).transpose(1, 2)


class RelationalMemory(nn.Module):
    """R2Gen's relational memory: `slots` vectors of size d, updated once per token."""

    def __init__(self, d: int, slots: int, heads: int) -> None:
        super().__init__()
        self.slots = slots
        self.start = nn.Parameter(torch.eye(slots, d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.gate_input = nn.Linear(d, 2 * d)
        self.gate_memory = nn.Linear(d, 2 * d)

    def initial(self, batch: int) -> torch.Tensor:
        return self.start.unsqueeze(0).expand(batch, -1, -1)

    def step(self, memory: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """memory (B, slots, d), token embedding (B, d) -> the next memory."""
        both = torch.cat([memory, token.unsqueeze(1)], dim=1)
        attended, _ = self.attn(memory, both, both, need_weights=False)
        candidate = memory + attended
        candidate = candidate + self.mlp(candidate)
        gates = self.gate_memory(torch.tanh(memory)) + self.gate_input(token).unsqueeze(1)
        input_gate, forget_gate = gates.chunk(2, dim=-1)
        return torch.sigmoid(input_gate) * torch.tanh(candidate) + \
            torch.sigmoid(forget_gate) * memory

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, T, d) -> each position's memory, flattened (B, T, slots*d), and
        the last memory (to continue from)."""
        memory = self.initial(tokens.shape[0]) if memory is None else memory
        states = []
        for t in range(tokens.shape[1]):
            memory = self.step(memory, tokens[:, t])
            states.append(memory.flatten(1))
        return torch.stack(states, dim=1), memory


class MCLN(nn.Module):
    """Memory-driven conditional layer norm: LayerNorm whose scale and shift each add an
    MLP of the relational memory."""

    def __init__(self, d: int, memory_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.gamma = nn.Parameter(torch.ones(d))
        self.beta = nn.Parameter(torch.zeros(d))
        self.delta_gamma = nn.Sequential(nn.Linear(memory_dim, d), nn.ReLU(), nn.Linear(d, d))
        self.delta_beta = nn.Sequential(nn.Linear(memory_dim, d), nn.ReLU(), nn.Linear(d, d))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return ((self.gamma + self.delta_gamma(memory)) * self.norm(x)
                + self.beta + self.delta_beta(memory))


class DecoderLayer(nn.Module):
    """Pre-norm self-attention, cross-attention over the image, feed-forward; each norm an
    MCLN."""

    def __init__(self, d: int, heads: int, memory_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norms = nn.ModuleList(MCLN(d, memory_dim) for _ in range(3))

    def forward(self, x: torch.Tensor, image: torch.Tensor, memory: torch.Tensor,
                causal: torch.Tensor) -> torch.Tensor:
        h = self.norms[0](x, memory)
        x = x + self.self_attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = self.norms[1](x, memory)
        x = x + self.cross_attn(h, image, image, need_weights=False)[0]
        return x + self.ffn(self.norms[2](x, memory))


class R2GenTiny(nn.Module):
    """The model (module docstring): `forward(images, tokens)` gives next-token logits."""

    def __init__(self, vocab_size: int, d: int = 64, heads: int = 4, encoder_layers: int = 2,
                 decoder_layers: int = 2, slots: int = 3, max_len: int = 64) -> None:
        super().__init__()
        self.max_len = max_len
        self.visual = VisualExtractor(d)
        self.patch_pos = nn.Parameter(torch.zeros(1, 64, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, encoder_layers, enable_nested_tensor=False)
        self.embed = nn.Embedding(vocab_size, d, padding_idx=PAD)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d))
        self.memory = RelationalMemory(d, slots, heads)
        self.layers = nn.ModuleList(DecoderLayer(d, heads, slots * d)
                                    for _ in range(decoder_layers))
        self.out_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.visual(images) + self.patch_pos)

    def decode(self, image: torch.Tensor, tokens: torch.Tensor, memories: torch.Tensor
               ) -> torch.Tensor:
        """Logits (B, T, vocab) for `tokens` (B, T), given each position's memory."""
        t = tokens.shape[1]
        x = self.embed(tokens) + self.pos[:, :t]
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        for layer in self.layers:
            x = layer(x, image, memories, causal)
        return self.head(self.out_norm(x))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        memories, _ = self.memory(self.embed(tokens))
        return self.decode(self.encode(images), tokens, memories)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, beam: int = 1, max_len: int | None = None
                 ) -> torch.Tensor:
        """Token ids (B, <= max_len) after BOS, each ending at its EOS (then PAD): greedy
        with beam=1, else beam search keeping `beam` hypotheses, scored by their summed
        log-probability over their length."""
        max_len = min(max_len or self.max_len, self.max_len)
        b, k = images.shape[0], beam
        image = self.encode(images).repeat_interleave(k, dim=0)
        seqs = torch.full((b * k, 1), BOS, dtype=torch.long, device=images.device)
        scores = torch.zeros(b, k, device=images.device)
        scores[:, 1:] = float("-inf")  # every beam starts as the same hypothesis
        done = torch.zeros(b * k, dtype=torch.bool, device=images.device)
        memory, states = None, []
        for _ in range(max_len - 1):
            state, memory = self.memory(self.embed(seqs[:, -1:]), memory)
            states.append(state)
            logp = self.decode(image, seqs, torch.cat(states, 1))[:, -1].log_softmax(-1)
            # a finished hypothesis may only continue with PAD, at no cost
            logp[done] = float("-inf")
            logp[done, PAD] = 0.0
            total = (scores.view(-1, 1) + logp).view(b, k * logp.shape[1])
            scores, flat = total.topk(k, dim=1)
            origin = (flat // logp.shape[1] + torch.arange(b, device=flat.device)[:, None] * k
                      ).view(-1)
            chosen = (flat % logp.shape[1]).view(-1, 1)
            seqs = torch.cat([seqs[origin], chosen], dim=1)
            memory, states = memory[origin], [s[origin] for s in states]
            done = done[origin] | (chosen.squeeze(1) == EOS) | (chosen.squeeze(1) == PAD)
            if bool(done.all()):
                break
        lengths = (seqs[:, 1:] != PAD).sum(1).clamp(min=1).view(b, k).float()
        best = (scores / lengths).argmax(1) + torch.arange(b, device=seqs.device) * k
        return seqs[best, 1:]
