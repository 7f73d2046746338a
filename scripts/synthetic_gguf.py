#!/usr/bin/env python3
"""Write a synthetic llama GGUF: random weights, a byte-level BPE vocabulary, a ChatML template.

Its text is noise, but llama.cpp loads and runs it like any real model, so it makes
fast tests (the tiny default takes milliseconds) and, at realistic shapes, benchmark
models whose speed is real:

    python scripts/synthetic_gguf.py tiny.gguf
    python scripts/synthetic_gguf.py llama-0.5b.gguf --preset 0.5b --quantize Q4_0
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# A few merges so the BPE tokenizer has something to merge; the rest of the text stays as bytes.
MERGES = ("Ġ t", "h e", "i n", "Ġ a", "e r", "o n", "Ġt he", "r e")


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int


PRESETS = {
    "tiny": Shape(n_embd=64, n_ff=128, n_layer=2, n_head=4, n_head_kv=2, n_ctx_train=512),
    "0.5b": Shape(n_embd=1024, n_ff=4096, n_layer=24, n_head=16, n_head_kv=16, n_ctx_train=4096),
    "1b": Shape(n_embd=2048, n_ff=5632, n_layer=22, n_head=32, n_head_kv=4, n_ctx_train=4096),
}


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table: every byte gets a printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(printable, codes, strict=True))
    return [chr(table[byte]) for byte in range(256)]


def vocabulary(extra_special: tuple[str, ...] = ()) -> tuple[list[str], list[int]]:
    """Tokens and their types: 256 bytes, the merge results, then control tokens."""
    tokens = byte_tokens()
    for merge in MERGES:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    types = [1] * len(tokens)  # NORMAL
    specials = [*SPECIAL_TOKENS, *(token for token in extra_special if token not in SPECIAL_TOKENS)]
    tokens += specials
    types += [3] * len(specials)  # CONTROL
    return tokens, types


def write_model(
    path: Path,
    shape: Shape = PRESETS["tiny"],
    *,
    seed: int = 0,
    float_type: str = "f32",
    split_max_tensors: int = 0,
    chat_template: str = CHATML_TEMPLATE,
    special_tokens: tuple[str, ...] = (),
    eos_token: str = "<|im_end|>",
) -> Path:
    """Write the model to ``path``; weights are random but fixed by ``seed``.

    ``special_tokens`` are more control tokens (a chat format's markers), ``eos_token`` one of them or of
    the ChatML ones.

    With ``split_max_tensors`` the model is split into ``<stem>-0000i-of-0000n.gguf`` parts
    beside ``path``, and the first part is returned.
    """
    import gguf

    rng = np.random.default_rng(seed)
    dtype = np.float16 if float_type == "f16" else np.float32
    tokens, token_types = vocabulary(special_tokens)
    n_vocab = len(tokens)
    head_dim = shape.n_embd // shape.n_head
    n_embd_kv = head_dim * shape.n_head_kv

    writer = gguf.GGUFWriter(str(path), "llama", split_max_tensors=split_max_tensors)
    writer.add_name(f"synthetic-llama-{shape.n_layer}x{shape.n_embd}")
    writer.add_license("mit")
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layer)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if float_type == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index(eos_token))
    writer.add_add_bos_token(False)
    writer.add_chat_template(chat_template)

    def weight(*dims: int, scale: float | None = None) -> np.ndarray:
        std = scale if scale is not None else 1.0 / np.sqrt(dims[-1])
        return (rng.standard_normal(dims, dtype=np.float32) * std).astype(dtype)

    def norm() -> np.ndarray:
        return np.ones(shape.n_embd, dtype=np.float32)  # norms stay f32, as llama.cpp's converter writes them

    writer.add_tensor("token_embd.weight", weight(n_vocab, shape.n_embd, scale=0.02))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(n_vocab, shape.n_embd))
    for layer in range(shape.n_layer):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm())
        writer.add_tensor(f"{prefix}.attn_q.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{prefix}.attn_k.weight", weight(n_embd_kv, shape.n_embd))
        writer.add_tensor(f"{prefix}.attn_v.weight", weight(n_embd_kv, shape.n_embd))
        writer.add_tensor(f"{prefix}.attn_output.weight", weight(shape.n_embd, shape.n_embd))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm())
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(shape.n_ff, shape.n_embd))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(shape.n_embd, shape.n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    parts = sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    return parts[0] if split_max_tensors and parts else path


def quantize(source: Path, target: Path, quant: str, threads: int = 0) -> Path:
    """Quantize with llama.cpp's own ``llama_model_quantize`` (e.g. ``Q4_0``, ``Q4_K_M``, ``Q8_0``)."""
    import gguf

    from llmrun.engine.native import init_native

    llama_cpp = init_native()  # llama.cpp's log lines go to llmrun's quiet log, not the terminal
    file_type = gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize failed with {status}")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize", metavar="TYPE", help="e.g. Q4_0, Q4_K_M, Q8_0 (writes F16 first)")
    args = parser.parse_args(argv)
    shape = PRESETS[args.preset]
    if args.quantize:
        f16 = args.output.with_name(args.output.stem + ".f16.gguf")
        write_model(f16, shape, seed=args.seed, float_type="f16")
        quantize(f16, args.output, args.quantize)
        f16.unlink()
    else:
        write_model(args.output, shape, seed=args.seed)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
