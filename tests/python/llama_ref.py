"""Plain NumPy (float64) reference of the `llama` architecture, written from the
model definition: embedding -> N x [RMSNorm -> GQA attention with RoPE ->
residual; RMSNorm -> SwiGLU FFN -> residual] -> RMSNorm -> output head.

Weights come from a GGUF file through the PyPI `gguf` package, dequantized to
float64, so the only differences to an engine are its own roundings.
"""
from __future__ import annotations

import dataclasses

import gguf
import numpy as np

from gguf import GGMLQuantizationType as QT


@dataclasses.dataclass
class Hparams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_rot: int
    rope_base: float
    rms_eps: float


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _matrix(t) -> np.ndarray:
    """A GGUF tensor with dims [cols, rows] as a (rows, cols) float64 matrix."""
    dims = [int(d) for d in t.shape]  # GGUF order: dims[0] is contiguous
    if t.tensor_type in (QT.F32, QT.F16):
        flat = np.asarray(t.data).reshape(-1)
    else:
        flat = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1)
    return flat.astype(np.float64).reshape(list(reversed(dims)))


class LlamaRef:
    def __init__(self, path: str, only_embd_rows: bool = False):
        r = gguf.GGUFReader(path)
        arch = _field(r, "general.architecture")
        assert arch == "llama", arch
        g = lambda k, d=None: _field(r, f"llama.{k}", d)  # noqa: E731
        tensors = {t.name: t for t in r.tensors}
        n_embd = int(g("embedding_length"))
        n_head = int(g("attention.head_count"))
        head_dim = int(g("attention.key_length", n_embd // n_head))
        self.hp = Hparams(
            n_vocab=int(tensors["token_embd.weight"].shape[1]),
            n_embd=n_embd,
            n_layer=int(g("block_count")),
            n_head=n_head,
            n_head_kv=int(g("attention.head_count_kv", n_head)),
            head_dim=head_dim,
            n_ff=int(g("feed_forward_length")),
            n_rot=int(g("rope.dimension_count", head_dim)),
            rope_base=float(g("rope.freq_base", 10000.0)),
            rms_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        )
        self.tok_embd = _matrix(tensors["token_embd.weight"])  # (n_vocab, n_embd)
        self.tied = "output.weight" not in tensors
        self.output = self.tok_embd if self.tied else _matrix(tensors["output.weight"])
        self.output_norm = _matrix(tensors["output_norm.weight"])
        self.layers = []
        for i in range(self.hp.n_layer):
            m = lambda n: _matrix(tensors[f"blk.{i}.{n}.weight"])  # noqa: E731
            self.layers.append({n: m(n) for n in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")})
        self.weight_types = {t.name: t.tensor_type for t in r.tensors}

    # -- building blocks ---------------------------------------------------------

    def rmsnorm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.hp.rms_eps) * w

    def rope(self, x: np.ndarray, pos: np.ndarray, neox: bool = False) -> np.ndarray:
        """x: (n_tokens, n_heads, head_dim). Rotates the first n_rot dims of each head.

        GGUF llama convention: dims (2i, 2i+1) form pair i with angle
        pos * base^(-2i/n_rot). neox=True pairs (i, i + n_rot/2) instead: the
        wrong convention for llama GGUFs, kept to show the tests catch it.
        """
        n_rot = self.hp.n_rot
        half = n_rot // 2
        inv_freq = self.hp.rope_base ** (-2.0 * np.arange(half) / n_rot)
        theta = pos[:, None].astype(np.float64) * inv_freq[None, :]  # (n, half)
        c = np.cos(theta)[:, None, :]
        s = np.sin(theta)[:, None, :]
        out = x.copy()
        if neox:
            a, b = x[..., :half], x[..., half:n_rot]
            out[..., :half] = a * c - b * s
            out[..., half:n_rot] = a * s + b * c
        else:
            a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
            out[..., 0:n_rot:2] = a * c - b * s
            out[..., 1:n_rot:2] = a * s + b * c
        return out

    # -- forward -----------------------------------------------------------------

    def forward(self, tokens, neox: bool = False, kv_f16: bool = False) -> np.ndarray:
        """Logits (n_tokens, n_vocab) after each token, positions 0..n-1.

        kv_f16 rounds K (after RoPE) and V to float16, as kvq's f16 KV cache stores them.
        """
        hp = self.hp
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        pos = np.arange(n)
        x = self.tok_embd[tokens].copy()
        group = hp.n_head // hp.n_head_kv
        scale = 1.0 / np.sqrt(hp.head_dim)
        causal = np.triu(np.ones((n, n), dtype=bool), k=1)  # True where key is in the future
        for L in self.layers:
            h = self.rmsnorm(x, L["attn_norm"])
            q = (h @ L["attn_q"].T).reshape(n, hp.n_head, hp.head_dim)
            k = (h @ L["attn_k"].T).reshape(n, hp.n_head_kv, hp.head_dim)
            v = (h @ L["attn_v"].T).reshape(n, hp.n_head_kv, hp.head_dim)
            q = self.rope(q, pos, neox)
            k = self.rope(k, pos, neox)
            if kv_f16:
                k = k.astype(np.float16).astype(np.float64)
                v = v.astype(np.float16).astype(np.float64)
            attn = np.empty((n, hp.n_head, hp.head_dim))
            for hd in range(hp.n_head):
                kv = hd // group  # grouped-query attention: query heads share KV heads
                scores = (q[:, hd, :] @ k[:, kv, :].T) * scale  # (n, n)
                scores[causal] = -np.inf
                scores -= scores.max(axis=1, keepdims=True)
                p = np.exp(scores)
                p /= p.sum(axis=1, keepdims=True)
                attn[:, hd, :] = p @ v[:, kv, :]
            x = x + attn.reshape(n, -1) @ L["attn_output"].T
            h = self.rmsnorm(x, L["ffn_norm"])
            gate = h @ L["ffn_gate"].T
            up = h @ L["ffn_up"].T
            silu = gate / (1.0 + np.exp(-gate))
            x = x + (silu * up) @ L["ffn_down"].T
        return self.rmsnorm(x, self.output_norm) @ self.output.T


def perplexity(logits: np.ndarray, tokens) -> float:
    """exp(mean NLL of token t+1 given the logits after token t)."""
    lg = np.asarray(logits, dtype=np.float64)[:-1]
    nxt = np.asarray(tokens, dtype=np.int64)[1:]
    m = lg.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(lg - m).sum(axis=1, keepdims=True)))[:, 0]
    nll = logz - lg[np.arange(len(nxt)), nxt]
    return float(np.exp(nll.mean()))
