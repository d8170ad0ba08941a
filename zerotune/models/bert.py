"""BERT-style bidirectional Transformer encoder (Devlin et al., 2019, https://arxiv.org/abs/1810.04805).

For token ids x (B, T), segment ids s (B, T) and a padding mask m (B, T) (1 = real token):

    h⁰ = LN(E_word[x] + E_pos[0…T-1] + E_type[s])                     embeddings, (B, T, H)
    for each of the L layers (post-norm, as in BERT):
        Q, K, V = h Wq + bq, h Wk + bk, h Wv + bv                     split into n heads of d = H/n
        A = softmax(Q Kᵀ / √d + M) V,   M = 0 where m = 1, −∞ where m = 0   (key padding mask)
        h = LN(h + Dropout(A Wo + bo))
        h = LN(h + Dropout(GELU(h W₁ + b₁) W₂ + b₂))                   W₁ ∈ ℝ^{H × I}
    output: h^L, the last hidden states (B, T, H)

Attention runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPU). GELU is the exact erf form, as in the released BERT and MiniLM checkpoints. Weights start
from N(0, 0.02²), biases at zero, LayerNorm at (1, 0), like BERT.

Heads, chosen by ``info.target`` in :func:`build`:

    classification / regression   SequenceClassifier: pool (mean over real tokens, or [CLS]) → linear
    token_classification          TokenClassifier: a linear layer on every position
    masked_lm                     BERTMaskedLM: logits = LN(GELU(h Wt + bt)) E_wordᵀ + b   (tied decoder)
    encoder                       the bare encoder, h^L

An imported Hugging Face checkpoint may carry BERT's pooler, tanh(h₀ Wp + bp); it is kept so
the weights export back unchanged, is available as :meth:`BERT.pooled_output`, and is frozen
because no zerotune head trains through it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from zerotune.errors import ZerotuneError
from zerotune.models.heads import SequenceClassifier, TokenClassifier, real_token_mask
from zerotune.models.init import check_scheme, init_weights
from zerotune.spec import DataInfo

ACTIVATIONS = {
    "gelu": nn.GELU,  # exact erf form
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
}


class BERTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["bert"] = "bert"
    vocab_size: int | None = Field(None, ge=1)  # None: from the data's tokenizer
    hidden: int = Field(256, ge=1)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    intermediate: int = Field(1024, ge=1)
    max_position: int = Field(512, ge=1)
    type_vocab_size: int = Field(2, ge=1)
    layer_norm_eps: float = Field(1e-12, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)  # on embeddings and residual branches
    attention_dropout: float = Field(0.1, ge=0, lt=1)  # on attention probabilities; off when dropout is 0
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    init: str = "normal(0.02)"
    pooling: Literal["mean", "cls"] = "mean"  # sequence heads: mean over real tokens, or [CLS]
    pooler: bool = False  # keep BERT's tanh pooler (set when a checkpoint has one)

    _check_init = field_validator("init")(lambda cls, v: check_scheme(v))

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> BERTConfig:
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})")
        return self


class Embeddings(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden: int,
        max_position: int,
        type_vocab_size: int,
        eps: float,
        dropout: float,
    ) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_position, hidden)
        self.token_type = nn.Embedding(type_vocab_size, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.position.num_embeddings:
            raise ZerotuneError(
                f"input_ids: sequence length {T} exceeds model.max_position {self.position.num_embeddings}"
            )
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)  # (B, T, H)
        return self.dropout(self.norm(x))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        d = H // self.heads
        q = self.query(x).view(B, T, self.heads, d).transpose(1, 2)  # (B, n, T, d)
        k = self.key(x).view(B, T, self.heads, d).transpose(1, 2)  # (B, n, T, d)
        v = self.value(x).view(B, T, self.heads, d).transpose(1, 2)  # (B, n, T, d)
        p = self.dropout if self.training else 0.0
        bias = attention_bias(mask, q.dtype)  # (B, 1, 1, T); in q's dtype so bf16 autocast stays finite
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)  # (B, n, T, d)
        return self.out(a.transpose(1, 2).reshape(B, T, H))  # (B, T, H)


class FeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))  # (B, T, H)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BERTConfig) -> None:
        super().__init__()
        # model.dropout = 0 turns every dropout off, attention dropout included
        self.attn = SelfAttention(cfg.hidden, cfg.heads, cfg.attention_dropout if cfg.dropout > 0 else 0.0)
        self.attn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg.hidden, cfg.intermediate, cfg.activation)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.attn_norm(h + self.dropout(self.attn(h, mask)))  # (B, T, H)
        return self.ffn_norm(h + self.dropout(self.ffn(h)))  # (B, T, H)


def attention_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, T) mask of real tokens → additive (B, 1, 1, T) bias: 0 for real keys, dtype-min for padding.

    An additive bias (rather than a boolean mask) keeps a row of all-padding finite, as in BERT.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class BERT(nn.Module):
    """The bare encoder: ``forward(input_ids (B, T), attention_mask, token_type_ids) -> (B, T, H)``.

    ``attention_mask`` (B, T) is 1 for real tokens and 0 for padding; None means every token is real.
    """

    def __init__(self, cfg: BERTConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ZerotuneError("model.vocab_size: required when the data has no tokenizer")
        self.config = cfg
        self.embeddings = Embeddings(
            cfg.vocab_size, cfg.hidden, cfg.max_position, cfg.type_vocab_size, cfg.layer_norm_eps, cfg.dropout
        )
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.pooler = nn.Linear(cfg.hidden, cfg.hidden) if cfg.pooler else None
        init_weights(self, cfg.init)
        if self.pooler is not None:
            self.pooler.requires_grad_(False)

    @property
    def hidden(self) -> int:
        return self.config.hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self.embeddings(input_ids, token_type_ids)  # (B, T, H)
        for layer in self.layers:
            h = layer(h, attention_mask)  # (B, T, H)
        return h

    def pooled_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler on the [CLS] state: tanh(h₀ Wp + bp), (B, H). Needs ``pooler: true``."""
        if self.pooler is None:
            raise ZerotuneError("model.pooler: this encoder has no pooler")
        return torch.tanh(self.pooler(hidden[:, 0]))


class BERTMaskedLM(nn.Module):
    """Encoder + masked-language-model head whose decoder is tied to the word embeddings.

    ``forward(input_ids, attention_mask=None, token_type_ids=None) -> logits (B, T, V)``. Without an
    attention mask, tokens equal to ``pad_id`` are treated as padding.
    """

    def __init__(self, body: BERT, pad_id: int | None = None) -> None:
        super().__init__()
        cfg = body.config
        self.body = body
        self.pad_id = pad_id
        self.transform = nn.Linear(cfg.hidden, cfg.hidden)
        self.act = ACTIVATIONS[cfg.activation]()
        self.transform_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        init_weights(self.transform, cfg.init)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mask = real_token_mask(input_ids, attention_mask, self.pad_id)
        h = self.body(input_ids, attention_mask=mask, token_type_ids=token_type_ids)  # (B, T, H)
        h = self.transform_norm(self.act(self.transform(h)))  # (B, T, H)
        return F.linear(h, self.body.embeddings.word.weight, self.bias)  # (B, T, V)


TARGETS = ("classification", "regression", "token_classification", "masked_lm", "encoder")


def build(cfg: BERTConfig, info: DataInfo) -> nn.Module:
    """Build the encoder with the head ``info.target`` asks for (see the module docstring)."""
    if cfg.vocab_size is None:
        if info.vocab_size is None:
            raise ZerotuneError("model.vocab_size: not set and the data has no vocabulary (use a tokenizer)")
        cfg = cfg.model_copy(update={"vocab_size": info.vocab_size})
    body = BERT(cfg)
    target = info.target
    if target in ("classification", "regression"):
        model = SequenceClassifier(body, cfg.hidden, info.n_outputs, cfg.pooling, info.pad_id, cfg.dropout)
    elif target == "token_classification":
        model = TokenClassifier(body, cfg.hidden, max(len(info.classes), 1), info.pad_id, cfg.dropout)
    elif target == "masked_lm":
        return BERTMaskedLM(body, info.pad_id)
    elif target == "encoder":
        return body
    else:
        raise ZerotuneError(f"task {target!r}: a bert model supports {', '.join(TARGETS)}")
    init_weights(model.head, cfg.init)
    return model
