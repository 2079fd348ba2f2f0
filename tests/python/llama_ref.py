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

# Weight types whose dot products consume 8-bit, 32-element activation blocks.
_Q8_ACT_TYPES = {QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0}


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


def _block_mins(t) -> np.ndarray | None:
    """Per-block mins (rows, cols/32) of a Q4_1/Q5_1 tensor, else None."""
    if t.tensor_type not in (QT.Q4_1, QT.Q5_1):
        return None
    rows = int(t.shape[1])
    raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, -1)
    bb = 20 if t.tensor_type == QT.Q4_1 else 24  # block bytes: d, m (fp16), [qh], qs
    blocks = raw.reshape(rows, -1, bb)
    return blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0].astype(np.float64)


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
            L = {n: m(n) for n in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
            L["types"] = {n: tensors[f"blk.{i}.{n}.weight"].tensor_type for n in L}
            L["mins"] = {n: _block_mins(tensors[f"blk.{i}.{n}.weight"]) for n in L["types"]}
            self.layers.append(L)
        self.weight_types = {t.name: t.tensor_type for t in r.tensors}
        out_t = tensors["token_embd.weight" if self.tied else "output.weight"]
        self.output_type = out_t.tensor_type
        self.output_mins = _block_mins(out_t)

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

    @staticmethod
    def act_q8(x: np.ndarray) -> np.ndarray:
        """The 8-bit activation rounding of GGUF engines (Q8_0/Q8_1 from_float):
        per 32-block d = amax/127 (float32), q = round-half-away(x/d), value = fp16(d) * q."""
        xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)
        d = np.abs(xb).max(axis=2, keepdims=True) / np.float32(127)
        inv = np.float32(1) / np.where(d != 0, d, np.float32(1))
        inv = np.where(d != 0, inv, np.float32(0))
        t = (xb * inv).astype(np.float32)
        q = np.sign(t) * np.floor(np.abs(t) + np.float32(0.5))
        return (d.astype(np.float16).astype(np.float64) * q).reshape(x.shape)

    def mm(self, x: np.ndarray, w: np.ndarray, wtype, act_q8: bool, mins=None) -> np.ndarray:
        """x @ w.T; with act_q8, activations of 32-block quantized weights are
        first rounded as an engine that dots them against Q8_0/Q8_1 would.
        For Q4_1/Q5_1 (mins given) the min term uses Q8_1's s = fp16(d * sum q)
        instead of the exact fp16(d) * sum q."""
        if not (act_q8 and wtype in _Q8_ACT_TYPES):
            return x @ w.T
        xq = self.act_q8(x)
        y = xq @ w.T
        if mins is not None:
            xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)
            d = np.abs(xb).max(axis=2) / np.float32(127)
            qsum = (xq.reshape(x.shape[0], -1, 32).sum(axis=2)
                    / np.where(d != 0, d.astype(np.float16).astype(np.float64), 1.0))
            qsum = np.round(qsum)
            s_q81 = (qsum.astype(np.float32) * d).astype(np.float16).astype(np.float64)
            s_exact = qsum * d.astype(np.float16).astype(np.float64)
            y += (s_q81 - s_exact) @ mins.T  # mins: (rows, cols/32)
        return y

    # -- forward -----------------------------------------------------------------

    def forward(self, tokens, neox: bool = False, kv_f16: bool = False, act_q8: bool = False) -> np.ndarray:
        """Logits (n_tokens, n_vocab) after each token, positions 0..n-1.

        kv_f16 rounds K (after RoPE) and V to float16, as kvq's f16 KV cache stores them.
        act_q8 rounds the activations entering 32-block quantized matmuls to 8 bits.
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
            mm = lambda a, name: self.mm(a, L[name], L["types"][name], act_q8, L["mins"][name])  # noqa: E731
            h = self.rmsnorm(x, L["attn_norm"])
            q = (mm(h, "attn_q")).reshape(n, hp.n_head, hp.head_dim)
            k = (mm(h, "attn_k")).reshape(n, hp.n_head_kv, hp.head_dim)
            v = (mm(h, "attn_v")).reshape(n, hp.n_head_kv, hp.head_dim)
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
            x = x + mm(attn.reshape(n, -1), "attn_output")
            h = self.rmsnorm(x, L["ffn_norm"])
            gate = mm(h, "ffn_gate")
            up = mm(h, "ffn_up")
            silu = gate / (1.0 + np.exp(-gate))
            x = x + mm(silu * up, "ffn_down")
        return self.mm(self.rmsnorm(x, self.output_norm), self.output, self.output_type, act_q8, self.output_mins)


def perplexity(logits: np.ndarray, tokens) -> float:
    """exp(mean NLL of token t+1 given the logits after token t)."""
    lg = np.asarray(logits, dtype=np.float64)[:-1]
    nxt = np.asarray(tokens, dtype=np.int64)[1:]
    m = lg.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(lg - m).sum(axis=1, keepdims=True)))[:, 0]
    nll = logz - lg[np.arange(len(nxt)), nxt]
    return float(np.exp(nll.mean()))
