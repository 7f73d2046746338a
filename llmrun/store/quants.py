"""llama.cpp quantization types as they appear in GGUF file names, with a word on each."""

from __future__ import annotations

import re

# Plain-words quality notes, from llama.cpp's own quantize tool descriptions and common measurements.
QUANT_NOTES: dict[str, str] = {
    "F32": "full 32-bit precision; huge, no quality loss",
    "F16": "16-bit; near-lossless, twice the size of Q8_0",
    "BF16": "bfloat16; near-lossless, twice the size of Q8_0",
    "Q8_0": "8-bit; practically lossless, large",
    "Q6_K": "6-bit; near-lossless, a good choice when it fits",
    "Q5_K_M": "5-bit; very close to the original",
    "Q5_K_S": "5-bit; very close to the original, slightly smaller",
    "Q5_1": "5-bit legacy; prefer Q5_K_M",
    "Q5_0": "5-bit legacy; prefer Q5_K_S",
    "Q4_K_M": "4-bit; the usual default, good balance of size and quality",
    "Q4_K_S": "4-bit; a little smaller and lower quality than Q4_K_M",
    "Q4_1": "4-bit legacy; fast on CPU, lower quality than Q4_K_M",
    "Q4_0": "4-bit legacy; fastest 4-bit on many CPUs, lower quality",
    "IQ4_NL": "4-bit non-linear; good quality for its size",
    "IQ4_XS": "4-bit importance-quantized; near Q4_K_M quality, smaller",
    "MXFP4": "4-bit microscaling float; for models trained for it",
    "Q3_K_L": "3-bit; noticeable quality loss",
    "Q3_K_M": "3-bit; noticeable quality loss",
    "Q3_K_S": "3-bit; significant quality loss",
    "IQ3_M": "3-bit importance-quantized; better than Q3_K_S",
    "IQ3_S": "3-bit importance-quantized",
    "IQ3_XS": "3-bit importance-quantized; lower quality",
    "IQ3_XXS": "3-bit importance-quantized; lower quality",
    "Q2_K": "2-bit; large quality loss, for when nothing else fits",
    "Q2_K_S": "2-bit; large quality loss",
    "IQ2_M": "2-bit importance-quantized; large quality loss",
    "IQ2_S": "2-bit importance-quantized; large quality loss",
    "IQ2_XS": "2-bit importance-quantized; very large quality loss",
    "IQ2_XXS": "2-bit importance-quantized; very large quality loss",
    "IQ1_M": "1-bit; barely usable",
    "IQ1_S": "1-bit; barely usable",
    "TQ1_0": "ternary; only for ternary-trained models",
    "TQ2_0": "ternary; only for ternary-trained models",
}

# When a repo has several quantizations and none was asked for: the first one present wins.
PREFERRED_ORDER = ("Q4_K_M", "Q4_K_S", "IQ4_XS", "Q5_K_M", "Q4_0", "Q4_1", "Q5_K_S", "Q6_K", "Q8_0")

_LABELS = sorted(QUANT_NOTES, key=len, reverse=True)  # longest first: Q4_K_M before Q4_K
# Unsloth's dynamic quants are written UD-Q4_K_XL.
_LABEL_RE = re.compile(
    r"(?:^|[^A-Za-z0-9])((?:UD-)?(?:Q[2-8]_K_XL|"
    + "|".join(re.escape(label) for label in _LABELS)
    + r"))(?=$|[^A-Za-z0-9])",
    re.IGNORECASE,
)


def quant_label(file_name: str) -> str | None:
    """``Qwen2.5-0.5B-Instruct-Q4_K_M.gguf`` -> ``Q4_K_M``; None when the name carries no known type."""
    stem = re.sub(r"(-\d{5}-of-\d{5})?\.gguf$", "", file_name.rsplit("/", 1)[-1], flags=re.IGNORECASE)
    matches = _LABEL_RE.findall(stem)
    return matches[-1].upper() if matches else None


def quant_note(label: str) -> str:
    base = label.upper().removeprefix("UD-")
    if base.endswith("_K_XL"):
        return f"{base[1]}-bit dynamic (Unsloth): important layers kept at higher precision"
    return QUANT_NOTES.get(base, "")
