"""Speculative decoding: prompt lookup and draft models give the answer plain decoding gives, token for token."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bench_spec
import httpx
import pytest
from conftest import Cli
from serving import Server

from llmrun.engine import Engine, GenerationRequest, LoadOptions, SamplingParams
from llmrun.engine.speculation import (
    MATCH_PRIORS,
    DecodeCosts,
    Lookup,
    SpeculationOptions,
    best_draft_length,
)
from llmrun.errors import DraftMismatch

GREEDY = SamplingParams(temperature=0)
CODE = """def common_prefix(cached, prompt):
    length = 0
    for cached_token, prompt_token in zip(cached, prompt):
        if cached_token != prompt_token:
            break
        length += 1
    return length"""
COPY = [{"role": "system", "content": "You copy text exactly."}, {"role": "user", "content": CODE}]
# The benchmark's code to copy: long enough that SmolLM2 copies most of it, and its answer reaches past 256
# cells of the cache.
LONG_CODE = bench_spec.CODE
LONG_COPY = [{"role": "system", "content": "You copy text exactly."}, {"role": "user", "content": LONG_CODE}]
# With an f16 KV cache, llama.cpp's flash attention splits a lone token's work across threads once a
# sequence reaches 256 cells (512 with padding), and a row of a batch is summed in another order: past
# that, a guess's row may round differently from plain decoding. A q8_0 cache takes one path at every
# depth, so there speculation is exact all the way.
EXACT_KV = {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
STORY = [{"role": "user", "content": "Tell me a story about a fox."}]
EXTRACT = [
    {
        "role": "user",
        "content": "Invoice 4411 from Acme Tools, dated 3 May, total 120.50 EUR, due in 30 days. "
        "Give the invoice number, company and total as JSON.",
    }
]


def answer(engine: Engine, messages: list[dict[str, Any]], **request: Any) -> tuple[list[int], Any]:
    """The completion tokens and the result of one generation, from an empty cache: a prompt found in the cache
    has only its end evaluated, in a smaller batch that llama.cpp rounds differently (as llama-server's
    cache_prompt), which is not what these tests are about."""
    engine.clear_memory()
    generation = engine.generate(GenerationRequest(tuple(engine.chat_prompt(messages)), **request))
    "".join(generation)
    return list(generation._sequence.completion_tokens), generation.result


def engine_with(model: Path, speculation: SpeculationOptions | None = None, **load: Any) -> Engine:
    return Engine(model, LoadOptions(speculation=speculation or SpeculationOptions(), **load))


# -- the pieces, without a model ---------------------------------------------------------


def test_lookup_guesses_what_followed_the_last_ngram() -> None:
    lookup = Lookup([1, 2, 3, 4, 5, 9, 1, 2])
    assert lookup.guess(3) == []  # the last 3 tokens (9, 1, 2) never came before
    lookup.append(3)
    assert lookup.guess(3) == [4, 5, 9]
    assert lookup.guess(1) == [4]
    lookup.append(7)  # (2, 3, 7) is new
    assert lookup.guess(3) == []


def test_lookup_learns_from_guesses_it_did_not_send() -> None:
    lookup = Lookup([5, 6, 7, 8, 9, 10, 11, 5, 6, 7])
    guess = lookup.guess(4)
    assert guess == [8, 9, 10, 11]
    assert lookup.likelihoods(4) == [MATCH_PRIORS[0], MATCH_PRIORS[0], MATCH_PRIORS[1], MATCH_PRIORS[1]]
    lookup.sent(guess, verifying=False)
    for token in guess:
        lookup.append(token)
    guess = lookup.guess(4)
    assert guess == [5, 6, 7, 8]
    after = lookup.likelihoods(4)  # all four came true: matches of 3 and 4 tokens, then of 5 and 6
    assert after[0] > MATCH_PRIORS[1]  # this guess's text before it matches over 7 tokens
    lookup.sent(guess, verifying=False)
    lookup.append(99)  # the first one did not
    assert lookup.likelihoods(1)[0] < after[0]


def test_a_verify_counts_only_the_run_of_right_guesses() -> None:
    cheap = DecodeCosts()
    for rows in (1, 2, 4, 8, 16, 17):
        cheap.record(rows, 0.01 * (1 + 0.02 * (rows - 1)))  # rows almost free: guess all that may come true
    assert best_draft_length([1.0] * 8, 8, 0, cheap) == 8
    # The third guess is sure to fail, so nothing after it can count: guessing past it only costs.
    assert best_draft_length([1.0, 1.0, 0.0, 1.0, 1.0, 1.0], 6, 0, cheap) == 2
    assert best_draft_length([0.0] * 8, 8, 0, cheap) == 0


def test_a_long_match_guesses_more_tokens_than_a_short_one() -> None:
    costs = DecodeCosts()
    for rows in (1, 2, 4, 8, 16, 17):
        costs.record(rows, 0.01 * (1 + 0.55 * (rows - 1)))  # a CPU with few cores
    copy = list(range(100, 180))
    short = Lookup([*copy[:20], 1, 2, 3, *copy[:3]])  # the last 3 tokens came before, nothing more
    long = Lookup([*copy, 1, 2, 3, *copy[:70]])  # the last 70 came before: the text is being copied
    assert short.guess(16) == copy[3:19] and long.guess(10) == copy[70:80]
    assert short.likelihoods(2) == [MATCH_PRIORS[0]] * 2
    assert long.likelihoods(2) == [MATCH_PRIORS[-1]] * 2
    assert best_draft_length(short.likelihoods(16), 16, 0, costs) == 0
    assert best_draft_length(long.likelihoods(10), 10, 0, costs) >= 8


def test_speculation_is_chosen_only_where_it_pays() -> None:
    expensive, cheap = DecodeCosts(), DecodeCosts()
    for rows in (1, 2, 4, 8, 16, 17):
        expensive.record(rows, 0.01 * (1 + 0.55 * (rows - 1)))  # a CPU with few cores
        cheap.record(rows, 0.01 * (1 + 0.02 * (rows - 1)))  # a GPU: rows are almost free
    assert best_draft_length(0.6, 16, 0, expensive) == 0
    assert best_draft_length(0.999, 16, 0, expensive) == 16
    assert best_draft_length(0.6, 16, 0, cheap) > 0
    assert best_draft_length(0.6, 16, 0, cheap, guess_cost=5.0) == 0  # a draft model as slow as the target
    # Beside seven other sequences decoding one token each, guessing pays less than alone.
    assert best_draft_length(0.9, 16, 7, expensive) <= best_draft_length(0.9, 16, 0, expensive)


def test_decode_costs_interpolate_between_measured_sizes() -> None:
    costs = DecodeCosts()
    assert costs.ratio(5) > 1  # a prior until measured
    costs.record(1, 1.0)
    costs.record(4, 2.5)
    costs.record(8, 4.5)
    assert costs.ratio(1) == 1
    assert costs.ratio(6) == pytest.approx(3.5)
    assert costs.ratio(10) == pytest.approx(5.5)  # the last slope, extended


# -- with the real SmolLM2 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(smollm2: Path) -> Iterator[Engine]:
    with engine_with(smollm2, n_ctx=512) as engine:
        yield engine


@pytest.fixture(scope="module")
def lookup(smollm2: Path) -> Iterator[Engine]:
    # draft_min: verify guesses even where this machine would not, so that every answer goes through them.
    with engine_with(smollm2, SpeculationOptions(lookup=True, draft_min=2), n_ctx=512) as engine:
        yield engine


@pytest.mark.parametrize("messages", [COPY, STORY, EXTRACT], ids=["copy", "story", "extract"])
def test_lookup_gives_the_plain_greedy_answer(plain: Engine, lookup: Engine, messages: list[dict[str, Any]]) -> None:
    """The default f16 cache, within 256 cells."""
    expected, _ = answer(plain, messages, sampling=GREEDY, max_tokens=120)
    tokens, result = answer(lookup, messages, sampling=GREEDY, max_tokens=120)
    assert tokens == expected
    assert result.accepted_tokens <= result.drafted_tokens


def test_a_copied_answer_is_mostly_guessed_right_and_the_same(smollm2: Path) -> None:
    with engine_with(smollm2, n_ctx=1024, **EXACT_KV) as engine:
        expected, _ = answer(engine, LONG_COPY, sampling=GREEDY, max_tokens=160)
    with engine_with(smollm2, SpeculationOptions(lookup=True, draft_min=1), n_ctx=1024, **EXACT_KV) as engine:
        tokens, result = answer(engine, LONG_COPY, sampling=GREEDY, max_tokens=160)
    assert tokens == expected
    assert result.drafted_tokens > 0
    assert result.accepted_tokens >= result.drafted_tokens // 2


def test_sampling_with_a_seed_gives_the_same_answer_with_speculation(plain: Engine, lookup: Engine) -> None:
    sampling = SamplingParams(temperature=0.9, seed=7)
    expected, _ = answer(plain, COPY, sampling=sampling, max_tokens=100)
    tokens, result = answer(lookup, COPY, sampling=sampling, max_tokens=100)
    assert tokens == expected
    assert result.drafted_tokens > 0


def test_stop_strings_and_max_tokens_end_where_plain_decoding_ends(plain: Engine, lookup: Engine) -> None:
    for request in ({"max_tokens": 7}, {"stop": ("prompt",), "max_tokens": 100}):
        expected, plain_result = answer(plain, COPY, sampling=GREEDY, **request)
        tokens, result = answer(lookup, COPY, sampling=GREEDY, **request)
        assert (tokens, result.text, result.finish_reason) == (expected, plain_result.text, plain_result.finish_reason)


@pytest.mark.slow  # 8 s; lookup's exactness is checked in the default run on shorter answers
def test_speculation_fills_the_context_exactly_as_plain_decoding(smollm2: Path) -> None:
    """To the last cell of the context, with the q8_0 cache (see EXACT_KV)."""
    request = {"sampling": GREEDY, "ignore_eos": True}
    with engine_with(smollm2, n_ctx=384, **EXACT_KV) as engine:
        expected, plain_result = answer(engine, LONG_COPY, **request)
    assert plain_result.context_full
    for speculation in (
        SpeculationOptions(lookup=True, draft_min=3),
        SpeculationOptions(draft=smollm2, draft_min=3, draft_max=6),
    ):
        with engine_with(smollm2, speculation, n_ctx=384, **EXACT_KV) as engine:
            tokens, result = answer(engine, LONG_COPY, **request)
        assert tokens == expected
        assert result.context_full and result.drafted_tokens > 0


@pytest.fixture(scope="module")
def smollm2_q8(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 quantized again, to Q8_0: another file with the same vocabulary."""
    from llmrun.engine.native import llama_cpp

    path = tmp_path_factory.mktemp("q8") / "smollm2-q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(smollm2).encode(), str(path).encode(), params) == 0
    return path


@pytest.mark.slow  # 26 s for both; serve --draft (default run) answers with accepted guesses
@pytest.mark.parametrize("draft", ["itself", "q8_0 copy"])
def test_a_draft_model_gives_the_plain_answer(plain: Engine, smollm2: Path, smollm2_q8: Path, draft: str) -> None:
    speculation = SpeculationOptions(draft=smollm2 if draft == "itself" else smollm2_q8, draft_min=4)
    with engine_with(smollm2, speculation, n_ctx=512) as engine:
        # The draft guesses greedily, without the default repeat penalty: so is the answer here.
        sampling = SamplingParams(temperature=0, repeat_penalty=1.0)
        for messages in (COPY, STORY):
            expected, _ = answer(plain, messages, sampling=sampling, max_tokens=100)
            tokens, result = answer(engine, messages, sampling=sampling, max_tokens=100)
            assert tokens == expected
            assert result.accepted_tokens >= result.drafted_tokens * (0.9 if draft == "itself" else 0.5)


def test_a_draft_with_another_vocabulary_is_refused(smollm2: Path, tiny_model: Path) -> None:
    with pytest.raises(DraftMismatch, match="cannot draft"):
        engine_with(smollm2, SpeculationOptions(draft=tiny_model), n_ctx=256)


# -- the command line and the server ---------------------------------------------------------


def test_run_json_reports_the_guesses(smollm2_cli: Cli) -> None:
    copy = ("run", "smollm2", "--system", "You copy text exactly.", "-t", "0", "-n", "60", "-ctk", "q8_0", "-ctv",
            "q8_0", "--json", "--no-log")  # fmt: skip
    result = smollm2_cli(*copy, "--lookup", "--draft-min", "2", input=LONG_CODE)
    assert result.returncode == 0, result.stderr
    record = result.json()
    speculation = record["speculation"]
    assert speculation["method"] == "lookup" and speculation["drafted_tokens"] > 0
    assert 0 < speculation["acceptance_rate"] <= 1
    plain = smollm2_cli(*copy, input=LONG_CODE)
    assert plain.json()["text"] == record["text"]
    assert "speculation" not in plain.json()


def test_run_verbose_says_how_many_guesses_were_right(smollm2_cli: Cli) -> None:
    result = smollm2_cli("run", "smollm2", "-t", "0", "-n", "20", "--lookup", "-v", "--no-log", input=CODE)
    assert result.returncode == 0, result.stderr
    assert "lookup:" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lookup", "--draft", "smollm2"], "--lookup and --draft"),
        (["--draft-max", "4", "--draft-min", "6"], "--draft-min 6 is more than --draft-max 4"),
        (["--draft", "nosuchmodel", "--no-pull"], "nosuchmodel"),
    ],
)
def test_speculation_options_that_cannot_work_are_one_line_errors(
    smollm2_cli: Cli, args: list[str], message: str
) -> None:
    result = smollm2_cli("run", "smollm2", "hi", *args, "--no-log")
    assert result.returncode in (1, 2, 3)  # 3: a model not in the store, as for the main model
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_a_draft_of_another_family_in_one_line(smollm2_cli: Cli, tiny_model: Path) -> None:
    result = smollm2_cli("run", "smollm2", "hi", "--draft", str(tiny_model), "--no-log")
    assert result.returncode == 2
    assert "cannot draft for" in result.stderr and "vocabulary" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_with_lookup_gives_eight_clients_their_answers_alone(smollm2_cli: Cli) -> None:
    options = "--lookup --draft-min 2 --parallel 8 --ctx 512 -ctk q8_0 -ctv q8_0 --no-log"
    server = Server(smollm2_cli, *options.split())
    try:
        client = server.openai()
        # Prompts under 64 tokens: a longer one, found in part in a slot's cache, would have its end evaluated in a
        # smaller batch than when it came first, which llama.cpp rounds differently (see answer()).
        questions = [[*COPY[:1], {"role": "user", "content": f"{name} = [1, 2, 3]\n{name}2 = [1, 2, 3]"}]
                     for name in ("size", "count", "total", "n", "width", "depth", "k", "run")]  # fmt: skip

        def ask(messages: list[dict[str, Any]]) -> Any:
            return client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=80)  # type: ignore[arg-type]

        alone = [ask(messages) for messages in questions]
        assert all(response.usage.prompt_tokens < 64 for response in alone)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, questions))
        assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
        details = together[0].usage.completion_tokens_details
        assert details is not None and details.accepted_prediction_tokens > 0
        metrics = httpx.get(f"{server.url}/metrics").text
        drafted = [line for line in metrics.splitlines() if line.startswith("llmrun_draft_tokens_total")]
        assert drafted and float(drafted[0].split()[-1]) > 0
    finally:
        assert server.stop() == 0


def test_serve_with_a_draft_model_and_one_it_cannot_draft_for(cli: Cli, smollm2: Path, tiny_model: Path) -> None:
    for path, name in ((smollm2, "smollm2"), (tiny_model, "tiny")):
        result = cli("import", str(path), "--name", name, "--link")
        assert result.returncode == 0, result.stderr
    server = Server(cli, "--draft", "smollm2", "--draft-min", "3", "--ctx", "512", "--no-log")
    try:
        client = server.openai()
        messages: Any = [{"role": "user", "content": "Name three colours."}]
        response = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=40)
        details = response.usage.completion_tokens_details  # type: ignore[union-attr]
        assert details is not None and details.accepted_prediction_tokens > 0
        # Another family: served without the draft, with a warning on the server's stderr.
        other = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
        assert other.usage is not None and other.usage.completion_tokens > 0
    finally:
        assert server.stop() == 0
    assert "cannot draft for" in server.process.stderr.read()  # type: ignore[union-attr]


def test_serve_config_sets_speculation_per_model(cli: Cli, smollm2: Path, tmp_path: Path) -> None:
    """`[models.NAME]` in serve's config: one model speculates by lookup, another by a draft model, a third not."""
    for name in ("smollm2", "drafted", "plain"):
        assert cli("import", str(smollm2), "--name", name, "--link").returncode == 0
    config = tmp_path / "serve.toml"
    config.write_text('[models.smollm2]\nlookup = true\ndraft_min = 2\n\n[models.drafted]\ndraft = "smollm2"\n'
                      'draft_min = 3\n', encoding="utf-8")  # fmt: skip
    server = Server.bare(cli, "--config", str(config), "--ctx", "512", "--no-log")
    try:
        client = server.openai()

        def details(model: str) -> Any:
            response = client.chat.completions.create(model=model, messages=COPY, temperature=0, max_tokens=60)  # type: ignore[arg-type]
            return response.usage.completion_tokens_details  # type: ignore[union-attr]

        assert details("smollm2").accepted_prediction_tokens > 0
        assert details("drafted").accepted_prediction_tokens > 0
        assert details("plain") is None
    finally:
        server.stop()
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.smollm2]\nlookup = true\ndraft = "smollm2"\n', encoding="utf-8")
    refused = cli("serve", "--config", str(bad))
    assert refused.returncode == 2 and "two ways to guess tokens" in refused.stderr
