"""Writes a tiny, seeded, random `llama` GGUF for forward-pass tests.

The tokenizer is a minimal byte-level BPE ("gpt2" model): the 256 GPT-2 byte
tokens, a handful of merges and an end-of-text control token, which is all a
byte-level tokenizer needs to accept the file.

Usage as a script: python3 make_tiny_llama.py OUT.gguf [variant]
"""
from __future__ import annotations

import sys

import gguf
import numpy as np

from gguf import GGMLQuantizationType as QT

# Variants: weight type per tensor family, output tying, rotary dims.
#   "emb": token_embd, "attn": q/k/v/o, "ffn": gate/up/down, "out": output.weight
VARIANTS = {
    # Exact float weights: engine and reference differ only by float32 rounding.
    "f32": dict(types=dict(emb=QT.F32, attn=QT.F32, ffn=QT.F32, out=QT.F32), tied=False, n_rot=16),
    # F16 weights (F32 activations in kvq), tied head, partial rotary (n_rot < head_dim).
    "f16_tied_partial_rope": dict(types=dict(emb=QT.F16, attn=QT.F16, ffn=QT.F16, out=None), tied=True, n_rot=8),
    # Mixed: Q8_0 attention, Q4_1 FFN, F16 embedding, Q8_0 untied head, 3 layers.
    "quant_mixed": dict(types=dict(emb=QT.F16, attn=QT.Q8_0, ffn=QT.Q4_1, out=QT.Q8_0), tied=False, n_rot=16,
                        n_layer=3),
}

N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM, N_FF, N_CTX = 64, 4, 2, 16, 96, 256
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "s")]


def gpt2_byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = gpt2_byte_chars()
    types = [1] * len(tokens)  # NORMAL
    merges = []
    for a, b in MERGES:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        types.append(1)
    tokens.append("<|endoftext|>")
    types.append(3)  # CONTROL
    return tokens, types, merges


def _add(w: gguf.GGUFWriter, name: str, arr: np.ndarray, qtype: QT) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == QT.F32:
        w.add_tensor(name, arr)
    elif qtype == QT.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def write_tiny_llama(path: str, variant: str = "f32", seed: int = 1234) -> None:
    cfg = VARIANTS[variant]
    types = cfg["types"]
    n_layer = cfg.get("n_layer", 2)
    rng = np.random.default_rng(seed)
    tokens, token_types, merges = vocab()
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"tiny-llama-{variant}")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(cfg["n_rot"])
    # A small base makes even the low-frequency pairs turn over 256 positions.
    w.add_rope_freq_base(500.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(n_vocab - 1)
    w.add_eos_token_id(n_vocab - 1)
    w.add_add_bos_token(False)

    def mat(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return rng.standard_normal((rows, cols)) * (gain / np.sqrt(cols))

    def norm_w(n: int) -> np.ndarray:
        return 1.0 + 0.2 * rng.standard_normal(n)

    _add(w, "token_embd.weight", rng.standard_normal((n_vocab, N_EMBD)), types["emb"])
    # A small final-norm gain keeps logits O(1) (sane perplexities) even when tied.
    _add(w, "output_norm.weight", 0.3 * norm_w(N_EMBD), QT.F32)
    if not cfg["tied"]:
        _add(w, "output.weight", mat(n_vocab, N_EMBD, 3.0), types["out"])
    qd, kvd = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    for i in range(n_layer):
        p = f"blk.{i}."
        _add(w, p + "attn_norm.weight", norm_w(N_EMBD), QT.F32)
        # Larger Q/K gains give peaked attention, so position and pairing matter.
        _add(w, p + "attn_q.weight", mat(qd, N_EMBD, 3.0), types["attn"])
        _add(w, p + "attn_k.weight", mat(kvd, N_EMBD, 3.0), types["attn"])
        _add(w, p + "attn_v.weight", mat(kvd, N_EMBD), types["attn"])
        _add(w, p + "attn_output.weight", mat(N_EMBD, qd), types["attn"])
        _add(w, p + "ffn_norm.weight", norm_w(N_EMBD), QT.F32)
        _add(w, p + "ffn_gate.weight", mat(N_FF, N_EMBD), types["ffn"])
        _add(w, p + "ffn_up.weight", mat(N_FF, N_EMBD), types["ffn"])
        _add(w, p + "ffn_down.weight", mat(N_EMBD, N_FF), types["ffn"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    write_tiny_llama(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "f32")
