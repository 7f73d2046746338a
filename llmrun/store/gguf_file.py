"""Read and validate a GGUF file's header, metadata and tensor table.

``gguf.GGUFReader`` builds a numpy view per array element and takes seconds on a
model with a 50k-token vocabulary; ``show`` and ``import`` need milliseconds, so
this module parses the header itself with ``struct`` and skips the large arrays.
The ``gguf`` package still supplies the type tables.  No llama_cpp here.
"""

from __future__ import annotations

import io
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from llmrun.errors import InvalidModelFile

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Arrays longer than this (vocabularies, merges) are skipped, keeping only their length.
MAX_KEPT_ARRAY_LEN = 64
# Guards against garbage lengths in a corrupt header.
MAX_STRING_LEN = 1 << 28
MAX_TENSORS = 1 << 20
MAX_DIMS = 8
SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)

# GGUFValueType -> struct format of a scalar.
_SCALAR_FORMATS: dict[int, str] = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_TYPE_STRING = 8
_TYPE_ARRAY = 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class ArraySummary:
    """A long metadata array, kept as its element type and length only."""

    element_type: int
    length: int


@dataclass
class GGUFFile:
    """The parsed header of one GGUF file."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    alignment: int = DEFAULT_ALIGNMENT

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        """A value under the architecture's own namespace, e.g. ``context_length``."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


class _Reader:
    def __init__(self, stream: BinaryIO, path: Path, file_size: int) -> None:
        self.stream = stream
        self.path = path
        self.file_size = file_size

    def _corrupt(self, what: str) -> InvalidModelFile:
        return InvalidModelFile(f"{self.path} has a corrupt GGUF header ({what})", "download or copy the file again")

    def _read(self, n_bytes: int) -> bytes:
        data = self.stream.read(n_bytes)
        if len(data) != n_bytes:
            raise InvalidModelFile(
                f"{self.path} is truncated: its GGUF header ends early",
                "download or copy the file again",
            )
        return data

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self._read(size))[0]

    def string(self) -> str:
        length = self.scalar("Q")
        if length > MAX_STRING_LEN:
            raise InvalidModelFile(f"{self.path} has a corrupt GGUF header (string of {length} bytes)")
        return self._read(length).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        length = self.scalar("Q")
        if length > MAX_STRING_LEN:
            raise InvalidModelFile(f"{self.path} has a corrupt GGUF header (string of {length} bytes)")
        self.stream.seek(length, io.SEEK_CUR)

    def value(self, value_type: int) -> Any:
        if value_type == _TYPE_STRING:
            return self.string()
        if value_type == _TYPE_ARRAY:
            element_type = self.scalar("I")
            length = self.scalar("Q")
            if element_type == _TYPE_ARRAY:
                raise self._corrupt("an array of arrays, which llama.cpp cannot read")
            if length > self.file_size - self.stream.tell():  # every element takes at least a byte
                raise self._corrupt(f"an array of {length} elements in a file of {self.file_size} bytes")
            if length > MAX_KEPT_ARRAY_LEN:
                self.skip_array(element_type, length)
                return ArraySummary(element_type, length)
            return [self.value(element_type) for _ in range(length)]
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise InvalidModelFile(f"{self.path} has a corrupt GGUF header (unknown value type {value_type})")
        return self.scalar(fmt)

    def skip_array(self, element_type: int, length: int) -> None:
        if element_type == _TYPE_STRING:
            for _ in range(length):
                self.skip_string()
        else:
            fmt = _SCALAR_FORMATS.get(element_type)
            if fmt is None:
                raise InvalidModelFile(f"{self.path} has a corrupt GGUF header (unknown value type {element_type})")
            self.stream.seek(struct.calcsize("<" + fmt) * length, io.SEEK_CUR)


def _tensor_bytes(ggml_type: int, n_elements: int, path: Path, name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise InvalidModelFile(
            f"{path}: tensor {name!r} has tensor type {ggml_type}, unknown to this version of gguf",
            "upgrade llmrun, or use a file made by a current llama.cpp",
        ) from None
    if n_elements % block_size:
        raise InvalidModelFile(f"{path}: tensor {name!r} does not fill whole quantization blocks")
    return n_elements // block_size * type_size


def read_gguf(path: Path) -> GGUFFile:
    """Parse and validate one GGUF file: header, metadata and that every tensor's data lies inside it."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        stream = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise InvalidModelFile(f"{path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise InvalidModelFile(f"{path} is a directory, not a GGUF file", "give the path of a .gguf file") from None
    except OSError as exc:
        raise InvalidModelFile(f"cannot read {path}: {exc.strerror}") from None
    with stream:
        reader = _Reader(stream, path, file_size)
        if stream.read(4) != GGUF_MAGIC:
            raise InvalidModelFile(f"{path} is not a GGUF file (wrong magic bytes)", "llmrun runs .gguf models only")
        version = reader.scalar("I")
        if version not in (2, 3):
            raise InvalidModelFile(f"{path} is GGUF version {version}; only versions 2 and 3 are supported")
        n_tensors = reader.scalar("Q")
        n_kv = reader.scalar("Q")
        if n_tensors > MAX_TENSORS or n_kv > MAX_TENSORS:
            raise InvalidModelFile(f"{path} has a corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("I"))
        raw_tensors = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = reader.scalar("I")
            if n_dims > MAX_DIMS:
                raise InvalidModelFile(f"{path}: tensor {name!r} has {n_dims} dimensions; the header is corrupt")
            shape = tuple(reader.scalar("Q") for _ in range(n_dims))
            raw_tensors.append((name, shape, reader.scalar("I"), reader.scalar("Q")))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise InvalidModelFile(f"{path} has an invalid alignment {alignment}")
        header_end = stream.tell()
    data_offset = (header_end + alignment - 1) // alignment * alignment

    tensors = []
    for name, shape, ggml_type, offset in raw_tensors:
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        n_bytes = _tensor_bytes(ggml_type, n_elements, path, name)
        end = data_offset + offset + n_bytes
        if end > file_size:
            raise InvalidModelFile(
                f"{path} is truncated: tensor {name!r} ends at byte {end} but the file has {file_size}",
                "download or copy the file again",
            )
        tensors.append(TensorInfo(name, shape, ggml_type, offset, n_elements, n_bytes))
    return GGUFFile(path, version, metadata, tensors, data_offset, file_size, alignment)


def split_part_paths(first: Path) -> list[Path]:
    """All parts of a split GGUF given its first part (``x-00001-of-00003.gguf``); ``[first]`` if not split."""
    match = SPLIT_RE.match(first.name)
    if not match:
        return [first]
    count = int(match["count"])
    return [first.with_name(f"{match['prefix']}-{index:05d}-of-{count:05d}.gguf") for index in range(1, count + 1)]


def read_model_files(first: Path) -> list[GGUFFile]:
    """Read every part of a (possibly split) model, checking that all parts are present."""
    match = SPLIT_RE.match(first.name)
    if match and int(match["index"]) != 1:
        raise InvalidModelFile(f"{first.name} is not the first part of a split model", "give the -00001-of- file")
    parts = split_part_paths(first)
    missing = [part.name for part in parts if not part.exists()]
    if missing:
        raise InvalidModelFile(
            f"split model {first.name} is missing {', '.join(missing)}", "put all parts in one folder"
        )
    return [read_gguf(part) for part in parts]


@dataclass(frozen=True)
class ModelInfo:
    """What ``show`` and ``list`` tell about a model, summarised from its GGUF metadata."""

    architecture: str
    name: str | None
    parameter_count: int
    quantization: str
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    license: str | None
    chat_template: str | None
    size_bytes: int

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the template text (``show --template`` prints that)."""
        return {
            "architecture": self.architecture,
            "name": self.name,
            "parameter_count": self.parameter_count,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "block_count": self.block_count,
            "embedding_length": self.embedding_length,
            "head_count": self.head_count,
            "head_count_kv": self.head_count_kv,
            "license": self.license,
            "has_chat_template": self.has_chat_template,
            "size_bytes": self.size_bytes,
        }


def _quantization_name(files: list[GGUFFile]) -> str:
    from gguf.constants import GGMLQuantizationType, LlamaFileType

    file_type = files[0].get("general.file_type")
    if isinstance(file_type, int):
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No (known) file type: name the tensor type holding most of the bytes.
    bytes_by_type: dict[int, int] = {}
    for gguf_file in files:
        for tensor in gguf_file.tensors:
            bytes_by_type[tensor.ggml_type] = bytes_by_type.get(tensor.ggml_type, 0) + tensor.n_bytes
    if not bytes_by_type:
        return "unknown"
    return GGMLQuantizationType(max(bytes_by_type, key=bytes_by_type.__getitem__)).name


def _optional_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def summarize(files: list[GGUFFile]) -> ModelInfo:
    """Summarise a model from all of its parts."""
    first = files[0]
    return ModelInfo(
        architecture=first.architecture,
        name=_optional_str(first.get("general.name")),
        parameter_count=sum(tensor.n_elements for gguf_file in files for tensor in gguf_file.tensors),
        quantization=_quantization_name(files),
        context_length=_optional_int(first.arch_value("context_length")),
        block_count=_optional_int(first.arch_value("block_count")),
        embedding_length=_optional_int(first.arch_value("embedding_length")),
        head_count=_optional_int(first.arch_value("attention.head_count")),
        head_count_kv=_optional_int(first.arch_value("attention.head_count_kv")),
        license=_optional_str(first.get("general.license")),
        chat_template=_optional_str(first.get("tokenizer.chat_template")),
        size_bytes=sum(gguf_file.file_size for gguf_file in files),
    )


def read_model_info(first: Path) -> ModelInfo:
    """Validate every part of a model and summarise it."""
    return summarize(read_model_files(first))
