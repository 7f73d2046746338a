"""A bounded, seeded fuzz of ``llmrun import``, ``list``, ``show`` and ``run`` with corrupt GGUF files.

About a hundred mutants of the tiny synthetic llama are made with one fixed ``random.Random`` seed, so a
failure names a mutant that the next run makes again byte for byte:

* header: the magic bytes, the version, and the tensor and key counts (zero, one off, huge, random);
* truncate: the file cut inside the header, the key/value metadata, the tensor infos, the padding and the
  tensor data (every one must be refused);
* flip: random bytes XORed inside the metadata and the tensor infos, singly and a few at once;
* length: string, key and array lengths, dimension counts, dimensions and tensor offsets set absurd (2**40,
  2**64 - 1...) or one off;
* retype: a value's, an array element's or a tensor's type changed, and numbers set to NaN or infinity;
* alignment: a ``general.alignment`` key added, valid or not, of the right type or not;
* nesting: an array of arrays nested thousands deep.

These are the corruptions an interrupted download, a bad disk or a hand-made file produce, and the places a
parser trusts a length or a type.  Each mutant is imported in-process (fast); every outcome must be an import
or a one-line ``error:`` naming the file, never a traceback or an "unexpected" error.  The store must then
list exactly the accepted mutants and ``show`` each one, and a small sample of them is run for real in a
subprocess (llama.cpp may abort on a bad file; that must not take pytest down), where a signal is a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import random
import signal
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Cli, CliResult
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from llmrun.cli.main import run_cli
from llmrun.settings import get_settings

SEED = 20250611
RUN_SAMPLE = 8
HEADER_SIZE = 24  # magic, version, tensor count, key count
ABSURD_LENGTHS = (2**32, 2**40, 2**63, 2**64 - 1)
EXPECTED_KINDS = ("header", "truncate", "flip", "length", "retype", "alignment", "nesting")
U32, U64, F32 = "I", "Q", "f"


def part_at(at: int, names: tuple[str, ...], starts: tuple[int, ...]) -> str:
    """Which of consecutive parts holds byte ``at``, given where each part after the first starts."""
    return names[sum(at >= start for start in starts)]


@dataclass(frozen=True)
class KeyValue:
    """Where one metadata key/value lies in the file."""

    key: str
    start: int  # the key's length (u64), then the key
    type_at: int  # the value's type (u32)
    value_at: int  # a scalar, a string's length (u64), or an array's element type (u32) and length (u64)
    end: int
    value_type: int

    def part(self, at: int) -> str:
        return part_at(at, ("key length", "key", "value type", "value"), (self.start + 8, self.type_at, self.value_at))


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor info lies in the file."""

    name: str
    start: int  # the name's length (u64), then the name
    n_dims_at: int
    dims_at: int
    type_at: int
    offset_at: int
    end: int

    def part(self, at: int) -> str:
        names = ("name length", "name", "dimension count", "dimensions", "type", "offset")
        return part_at(at, names, (self.start + 8, self.n_dims_at, self.dims_at, self.type_at, self.offset_at))


@dataclass(frozen=True)
class Layout:
    """The byte layout of the original file, from gguf's own reader."""

    size: int
    kvs: tuple[KeyValue, ...]
    tensors: tuple[TensorEntry, ...]
    data_offset: int

    @property
    def kv_end(self) -> int:
        return self.tensors[0].start

    @property
    def infos_end(self) -> int:
        return self.tensors[-1].end

    def kvs_of_type(self, *value_types: int) -> list[KeyValue]:
        return [kv for kv in self.kvs if kv.value_type in value_types]


@dataclass(frozen=True)
class Mutation:
    kind: str
    description: str
    data: bytes
    must_refuse: bool = False


@dataclass(frozen=True)
class Mutant:
    """A mutation written to disk, with the store name it is imported under."""

    name: str
    kind: str
    description: str
    path: Path
    must_refuse: bool

    def __str__(self) -> str:
        return f"{self.name} [{self.kind}] {self.description}"


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    result: CliResult

    @property
    def accepted(self) -> bool:
        return self.result.returncode == 0


@dataclass(frozen=True)
class Fuzzed:
    home: Path
    outcomes: list[Outcome]

    @property
    def accepted(self) -> list[Mutant]:
        return [outcome.mutant for outcome in self.outcomes if outcome.accepted]


# --- the layout of the original ---------------------------------------------------------------------------


def _part_starts(field: ReaderField) -> list[int]:
    starts = [field.offset]
    for part in field.parts:
        starts.append(starts[-1] + int(part.nbytes))
    return starts


def read_layout(path: Path) -> Layout:
    reader = GGUFReader(path)
    kvs = []
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):
            continue
        starts = _part_starts(field)
        kvs.append(KeyValue(field.name, starts[0], starts[2], starts[3], starts[-1], int(field.types[0])))
    tensors = []
    for tensor in reader.tensors:
        starts = _part_starts(tensor.field)
        tensors.append(TensorEntry(tensor.name, starts[0], starts[2], starts[3], starts[4], starts[5], starts[6]))
    return Layout(path.stat().st_size, tuple(kvs), tuple(tensors), reader.data_offset)


def where(layout: Layout, at: int) -> str:
    """A byte offset in words, for a mutant's description."""
    if at < HEADER_SIZE:
        return f"header {part_at(at, ('magic', 'version', 'tensor count', 'key count'), (4, 8, 16))} (byte {at})"
    for kv in layout.kvs:
        if kv.start <= at < kv.end:
            return f"{kv.part(at)} of key {kv.key!r} (byte {at})"
    for tensor in layout.tensors:
        if tensor.start <= at < tensor.end:
            return f"{tensor.part(at)} of tensor {tensor.name!r} (byte {at})"
    return f"{'padding' if at < layout.data_offset else 'tensor data'} (byte {at})"


# --- byte surgery -----------------------------------------------------------------------------------------


def put(data: bytes, at: int, fmt: str, value: int | float) -> bytes:
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, at, value)
    return bytes(out)


def get(data: bytes, at: int, fmt: str) -> int:
    return int(struct.unpack_from("<" + fmt, data, at)[0])


def xor(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for at, mask in flips:
        out[at] ^= mask
    return bytes(out)


def gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def kv_entry(key: str, value_type: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", value_type) + payload


def with_extra_kv(data: bytes, layout: Layout, entry: bytes, align: int = 32) -> bytes:
    """The file with one more key/value after the last, padded so the tensor data starts aligned again."""
    header = bytearray(data[: layout.kv_end] + entry + data[layout.kv_end : layout.infos_end])
    struct.pack_into("<Q", header, 16, get(data, 16, U64) + 1)
    return bytes(header) + bytes(-len(header) % align) + data[layout.data_offset :]


# --- the mutations ----------------------------------------------------------------------------------------


def header_mutations(rng: random.Random, data: bytes, layout: Layout) -> Iterator[Mutation]:
    random_magic = bytes(rng.randrange(256) for _ in range(4))
    for magic in (b"GGML", b"\0\0\0\0", b"FUGG", random_magic):
        yield Mutation("header", f"magic {magic!r}", magic + data[4:], must_refuse=magic != b"GGUF")
    for version in (0, 1, 2, 4, 2**32 - 1, rng.randrange(4, 2**32)):
        yield Mutation("header", f"version {version}", put(data, 4, U32, version), must_refuse=version not in (2, 3))
    for at, field in ((8, "tensor count"), (16, "key count")):
        actual = get(data, at, U64)
        for count in (0, actual - 1, actual + 1, 2**40, 2**64 - 1, rng.getrandbits(64)):
            huge = count in (2**40, 2**64 - 1)
            yield Mutation("header", f"{field} {count} (was {actual})", put(data, at, U64, count), must_refuse=huge)


def truncate_mutations(rng: random.Random, data: bytes, layout: Layout) -> Iterator[Mutation]:
    regions = [
        (1, HEADER_SIZE, 2),
        (HEADER_SIZE, layout.kv_end, 4),
        (layout.kv_end, layout.infos_end, 3),
        (layout.infos_end, layout.data_offset, 1),
        (layout.data_offset, layout.size - 1, 4),
    ]
    cuts = [0, layout.size - 1]
    for start, stop, count in regions:
        cuts += [rng.randrange(start, stop) for _ in range(count)]
    for cut in cuts:
        yield Mutation("truncate", f"cut to {cut} bytes, in {where(layout, cut)}", data[:cut], must_refuse=True)


def flip_mutations(rng: random.Random, data: bytes, layout: Layout) -> Iterator[Mutation]:
    """Single flips: anywhere in the metadata (mostly the vocabulary, its bulk), in one key/value picked first (its
    length and type fields too), and in the tensor infos; then a few at once anywhere before the tensor data."""
    kvs = [rng.choice(layout.kvs) for _ in range(8)]
    spans = [(HEADER_SIZE, layout.kv_end)] * 8 + [(kv.start, kv.end) for kv in kvs]
    spans += [(layout.kv_end, layout.infos_end)] * 7
    for start, stop in spans:
        at, mask = rng.randrange(start, stop), rng.randrange(1, 256)
        yield Mutation("flip", f"XOR {mask:#04x} at {where(layout, at)}", xor(data, [(at, mask)]))
    for _ in range(3):
        flips = sorted((rng.randrange(0, layout.infos_end), rng.randrange(1, 256)) for _ in range(rng.randrange(3, 7)))
        described = ", ".join(f"{mask:#04x} at {where(layout, at)}" for at, mask in flips)
        yield Mutation("flip", f"XOR {described}", xor(data, flips))


def length_mutations(rng: random.Random, data: bytes, layout: Layout) -> Iterator[Mutation]:
    strings = layout.kvs_of_type(GGUFValueType.STRING)
    arrays = layout.kvs_of_type(GGUFValueType.ARRAY)
    for length in ABSURD_LENGTHS:
        kv = rng.choice(layout.kvs)
        yield Mutation("length", f"key length of {kv.key!r} {length}", put(data, kv.start, U64, length), True)
    for length in ABSURD_LENGTHS:
        kv = rng.choice(strings)
        yield Mutation("length", f"string length of {kv.key!r} {length}", put(data, kv.value_at, U64, length), True)
    for delta in (-1, 1):
        kv = rng.choice(strings)
        length = get(data, kv.value_at, U64) + delta
        yield Mutation(
            "length", f"string length of {kv.key!r} {length} ({delta:+d})", put(data, kv.value_at, U64, length)
        )
    for kv, length in itertools.product(arrays, (2**40, 2**64 - 1)):  # arrays of strings skip otherwise than of numbers
        mutated = put(data, kv.value_at + 4, U64, length)
        yield Mutation("length", f"array length of {kv.key!r} {length}", mutated, must_refuse=True)
    tensor = rng.choice(layout.tensors)
    n_dims = rng.choice((9, 2**16, 2**32 - 1))
    yield Mutation(
        "length", f"{tensor.name!r} with {n_dims} dimensions", put(data, tensor.n_dims_at, U32, n_dims), True
    )
    for dim in (2**40, 0):
        tensor = rng.choice(layout.tensors)
        yield Mutation(
            "length", f"{tensor.name!r} dimension 0 set to {dim}", put(data, tensor.dims_at, U64, dim), dim > 0
        )
    tensor = rng.choice(layout.tensors)
    offset = get(data, tensor.offset_at, U64)
    for new_offset in (2**40, offset + 1):
        mutated = put(data, tensor.offset_at, U64, new_offset)
        yield Mutation("length", f"{tensor.name!r} offset {new_offset} (was {offset})", mutated, new_offset == 2**40)


def retype_mutations(rng: random.Random, data: bytes, layout: Layout) -> Iterator[Mutation]:
    scalars = [kv for kv in layout.kvs if kv.value_type not in (GGUFValueType.STRING, GGUFValueType.ARRAY)]
    arrays = layout.kvs_of_type(GGUFValueType.ARRAY)
    for _ in range(2):
        kv, value_type = rng.choice(layout.kvs), rng.randrange(13, 2**32)
        yield Mutation("retype", f"{kv.key!r} of value type {value_type}", put(data, kv.type_at, U32, value_type), True)
    for _ in range(2):
        kv = rng.choice(scalars)
        value_type = rng.choice([t for t in range(13) if t not in (kv.value_type, GGUFValueType.ARRAY)])
        yield Mutation("retype", f"{kv.key!r} of value type {value_type}", put(data, kv.type_at, U32, value_type))
    kv = rng.choice(arrays)
    for element_type in (rng.choice([t for t in range(13) if t != GGUFValueType.ARRAY]), GGUFValueType.ARRAY):
        mutated = put(data, kv.value_at, U32, element_type)
        yield Mutation("retype", f"array {kv.key!r} of element type {int(element_type)}", mutated)
    tensor = rng.choice(layout.tensors)
    tensor_type = 2**31 + rng.randrange(2**31)
    yield Mutation(
        "retype", f"{tensor.name!r} of tensor type {tensor_type}", put(data, tensor.type_at, U32, tensor_type), True
    )
    tensor = rng.choice(layout.tensors)
    yield Mutation("retype", f"{tensor.name!r} of tensor type F16 (1)", put(data, tensor.type_at, U32, 1))
    numbers = {kv.key: kv for kv in scalars}
    for key, value in (("llama.context_length", float("inf")), ("llama.embedding_length", float("nan"))):
        kv = numbers[key]
        mutated = put(put(data, kv.type_at, U32, GGUFValueType.FLOAT32), kv.value_at, F32, value)
        yield Mutation("retype", f"{key!r} as f32 {value}", mutated)


def alignment_mutations(rng: random.Random, data: bytes, layout: Layout) -> Iterator[Mutation]:
    """A ``general.alignment`` key after the others; the data is padded to it where it is a usable number."""
    cases: list[tuple[str, int, bytes, int, bool]] = [
        ("u32 0", GGUFValueType.UINT32, struct.pack("<I", 0), 32, True),
        ("u32 48, not a power of two", GGUFValueType.UINT32, struct.pack("<I", 48), 32, True),
        ("u32 64", GGUFValueType.UINT32, struct.pack("<I", 64), 64, False),
        ("u32 4096, more than the tensor offsets keep", GGUFValueType.UINT32, struct.pack("<I", 4096), 4096, False),
        ("i64 -32", GGUFValueType.INT64, struct.pack("<q", -32), 32, True),
        ("f32 32.0", GGUFValueType.FLOAT32, struct.pack("<f", 32.0), 32, False),
        ("bool true", GGUFValueType.BOOL, b"\1", 1, False),
        ("string '32'", GGUFValueType.STRING, gguf_string("32"), 32, False),
        ("string 'abc'", GGUFValueType.STRING, gguf_string("abc"), 32, False),
        ("array [32]", GGUFValueType.ARRAY, struct.pack("<IQI", GGUFValueType.UINT32, 1, 32), 32, False),
    ]
    for description, value_type, payload, pad_to, must_refuse in cases:
        mutated = with_extra_kv(data, layout, kv_entry("general.alignment", value_type, payload), pad_to)
        yield Mutation("alignment", f"general.alignment {description}", mutated, must_refuse)


def nesting_mutations(rng: random.Random, data: bytes, layout: Layout) -> Iterator[Mutation]:
    depth = rng.randrange(3000, 6000)
    nested = struct.pack("<IQ", GGUFValueType.ARRAY, 1) * depth + struct.pack("<IQ", GGUFValueType.UINT32, 0)
    entry = kv_entry("fuzz.nested", GGUFValueType.ARRAY, nested)
    yield Mutation("nesting", f"key 'fuzz.nested': an array of arrays {depth} deep", with_extra_kv(data, layout, entry))


MUTATORS = (
    header_mutations,
    truncate_mutations,
    flip_mutations,
    length_mutations,
    retype_mutations,
    alignment_mutations,
    nesting_mutations,
)


def mutations(original: Path, seed: int = SEED) -> Iterator[Mutation]:
    """Every mutation of ``original``, the same ones in the same order for the same seed."""
    rng = random.Random(seed)
    data = original.read_bytes()
    layout = read_layout(original)
    for mutator in MUTATORS:
        yield from mutator(rng, data, layout)


def write_mutants(original: Path, folder: Path) -> list[Mutant]:
    mutants = []
    for index, mutation in enumerate(mutations(original)):
        name = f"fuzz-{index}"
        path = folder / f"{name}.gguf"
        path.write_bytes(mutation.data)
        mutants.append(Mutant(name, mutation.kind, mutation.description, path, mutation.must_refuse))
    return mutants


# --- running the CLI --------------------------------------------------------------------------------------


def invoke(*args: str) -> CliResult:
    """Run the CLI in-process, capturing what it writes."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run_cli(list(args))
    return CliResult(code, stdout.getvalue(), stderr.getvalue())


def defect(result: CliResult) -> str | None:
    """What is wrong with how a command ended, whatever the file: a traceback or an unexpected error."""
    if "Traceback" in result.stderr:
        return "a traceback"
    if "error: unexpected" in result.stderr:
        return "an unexpected error"
    return None


def refusal_problem(result: CliResult, path: Path) -> str | None:
    """What is wrong with a refusal: anything but one ``error:`` line naming the file."""
    lines = result.stderr.strip().splitlines()
    if len(lines) != 1 or not lines[0].startswith("error: "):
        return "not one error line"
    if path.name not in lines[0]:
        return "an error that does not name the file"
    return None


def import_problem(outcome: Outcome) -> str | None:
    mutant, result = outcome.mutant, outcome.result
    if result.returncode not in (0, 1, 2):
        return f"exit code {result.returncode}"
    found = defect(result)
    if found:
        return found
    if outcome.accepted:
        if mutant.must_refuse:
            return "accepted, but it must be refused"
        return None if f"imported {mutant.name}" in result.stderr else "no 'imported' line"
    return refusal_problem(result, mutant.path)


def run_problem(result: CliResult) -> str | None:
    """What is wrong with how ``run`` ended: a signal, an odd exit code, a defect, or a failure without its line."""
    if result.returncode < 0:
        return f"killed by {signal.Signals(-result.returncode).name}"
    if result.returncode not in (0, 1):
        return f"exit code {result.returncode}"
    found = defect(result)
    if found:
        return found
    lines = result.stderr.strip().splitlines()
    if result.returncode == 1 and not (lines and lines[-1].startswith("error: ")):
        return "a failure without an error line"
    return None


def report(problems: list[tuple[Mutant, str, CliResult]]) -> str:
    return "\n".join(
        f"{mutant}: {problem} (exit {result.returncode}): {result.stderr.strip()[-400:]!r}"
        for mutant, problem, result in problems
    )


def run_sample(accepted: list[Mutant]) -> list[Mutant]:
    """At most RUN_SAMPLE accepted mutants, seeded, taking each kind in turn so the sample is varied."""
    rng = random.Random(SEED)
    by_kind: dict[str, list[Mutant]] = {}
    for mutant in accepted:
        by_kind.setdefault(mutant.kind, []).append(mutant)
    for group in by_kind.values():
        rng.shuffle(group)
    sample: list[Mutant] = []
    while len(sample) < min(RUN_SAMPLE, len(accepted)):
        for kind in sorted(by_kind):
            if by_kind[kind] and len(sample) < RUN_SAMPLE:
                sample.append(by_kind[kind].pop())
    return sample


# --- the tests --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Fuzzed]:
    """Every mutant imported in-process into one store (shared: the tests below only read it)."""
    folder = tmp_path_factory.mktemp("gguf-fuzz")
    home = folder / "llmrun-home"
    mutants = write_mutants(tiny_model, folder)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("LLMRUN_HOME", str(home))
        monkeypatch.delenv("LLMRUN_DEBUG", raising=False)
        get_settings.cache_clear()
        outcomes = [Outcome(mutant, invoke("import", str(mutant.path), "--name", mutant.name)) for mutant in mutants]
        yield Fuzzed(home, outcomes)
    get_settings.cache_clear()


def test_mutants_are_seeded_and_cover_every_kind(tiny_model: Path) -> None:
    def digest(seed: int) -> str:
        hashed = hashlib.sha256()
        for mutation in mutations(tiny_model, seed):
            hashed.update(f"{mutation.kind}|{mutation.description}|".encode() + mutation.data)
        return hashed.hexdigest()

    kinds = [mutation.kind for mutation in mutations(tiny_model)]
    assert 90 <= len(kinds) <= 120
    assert sorted(set(kinds)) == sorted(EXPECTED_KINDS)
    assert digest(SEED) == digest(SEED) != digest(SEED + 1)


def test_every_mutant_is_imported_or_refused_in_one_line(fuzzed: Fuzzed) -> None:
    problems = [
        (outcome.mutant, problem, outcome.result)
        for outcome in fuzzed.outcomes
        if (problem := import_problem(outcome)) is not None
    ]
    assert not problems, f"{len(problems)} of {len(fuzzed.outcomes)} mutants:\n{report(problems)}"
    assert fuzzed.accepted, "no mutant was accepted: the fuzz only reaches the first checks"
    assert len(fuzzed.accepted) < len(fuzzed.outcomes)


def test_the_store_lists_exactly_the_accepted_mutants(fuzzed: Fuzzed) -> None:
    result = invoke("list", "--json")
    assert result.returncode == 0 and defect(result) is None, result.stderr
    listed = sorted(entry["name"] for entry in json.loads(result.stdout))
    assert listed == sorted(mutant.name for mutant in fuzzed.accepted)
    tmp = fuzzed.home / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir()), "a refused import left a partial copy"


def test_every_accepted_mutant_shows(fuzzed: Fuzzed) -> None:
    problems = []
    for mutant in fuzzed.accepted:
        result = invoke("show", mutant.name)
        if result.returncode != 0 or defect(result):
            problems.append((mutant, defect(result) or "show failed", result))
        elif result.stdout.split("\n", 1)[0].split() != ["name", mutant.name]:
            problems.append((mutant, "show names another model", result))
    assert not problems, report(problems)


def test_a_sample_of_accepted_mutants_runs_or_fails_cleanly(fuzzed: Fuzzed) -> None:
    cli = Cli(fuzzed.home)
    problems = []
    for mutant in run_sample(fuzzed.accepted):
        # A small context: a flipped context length must not make the run allocate gigabytes.
        result = cli("run", mutant.name, "hi", "--max-tokens", "2", "--ctx", "128", "--temperature", "0", "--no-log")
        if (problem := run_problem(result)) is not None:
            problems.append((mutant, problem, result))
    assert not problems, report(problems)
