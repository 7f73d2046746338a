"""Reading GGUF headers without llama.cpp: metadata, validation, split files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmrun.errors import InvalidModelFile
from llmrun.store.gguf_file import read_gguf, read_model_info, split_part_paths


def test_smollm2_metadata_is_read(smollm2: Path) -> None:
    info = read_model_info(smollm2)
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert info.license == "apache-2.0"
    assert 130e6 < info.parameter_count < 140e6
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.size_bytes == smollm2.stat().st_size


def test_synthetic_model_metadata(tiny_model: Path) -> None:
    info = read_model_info(tiny_model)
    assert (info.architecture, info.quantization, info.context_length, info.block_count) == ("llama", "F32", 512, 2)
    assert info.license == "mit"


@pytest.mark.parametrize("keep_bytes", [3, 24, 2000, -100])
def test_truncated_file_is_refused(tmp_path: Path, tiny_model: Path, keep_bytes: int) -> None:
    data = tiny_model.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:keep_bytes])
    with pytest.raises(InvalidModelFile, match="truncated|not a GGUF"):
        read_gguf(truncated)


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("this is a text file, not a model\n" * 10)
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        read_gguf(fake)


def test_garbage_lengths_in_header_are_refused(tmp_path: Path, tiny_model: Path) -> None:
    data = bytearray(tiny_model.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # tensor count
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFile, match="corrupt"):
        read_gguf(corrupt)


def test_split_parts_are_named_and_checked(tmp_path: Path, tiny_model: Path) -> None:
    first = tmp_path / "m-00001-of-00002.gguf"
    shutil.copy(tiny_model, first)
    assert split_part_paths(first) == [first, tmp_path / "m-00002-of-00002.gguf"]
    with pytest.raises(InvalidModelFile, match="missing m-00002-of-00002.gguf"):
        read_model_info(first)
