"""The engine against the real llama.cpp: determinism, stops, UTF-8, context limits, several sequences."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmrun.engine import Engine, GenerationRequest, LoadOptions, SamplingParams
from llmrun.engine.resources import choose_context_size
from llmrun.engine.template import render_chat
from llmrun.engine.text import StopMatcher, Utf8Stream
from llmrun.errors import InvalidModelFile, PromptTooLong

GREEDY = SamplingParams(temperature=0.0, repeat_penalty=1.0)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_engine(smollm2: Path) -> Iterator[Engine]:
    with Engine(smollm2, LoadOptions(n_ctx=2048)) as engine:
        yield engine


@pytest.fixture(scope="module")
def tiny_engine(tiny_model: Path) -> Iterator[Engine]:
    with Engine(tiny_model, LoadOptions(n_ctx=512)) as engine:
        yield engine


def generate(engine: Engine, prompt: list[int], **kwargs: object) -> tuple[str, str]:
    request = GenerationRequest(prompt_tokens=tuple(prompt), **kwargs)  # type: ignore[arg-type]
    generation = engine.generate(request)
    text = "".join(generation)
    assert text == generation.result.text
    return text, generation.result.finish_reason


def test_smollm2_knows_the_capital_of_france(smollm2_engine: Engine) -> None:
    text, reason = generate(
        smollm2_engine, smollm2_engine.chat_prompt(QUESTION), sampling=SamplingParams(temperature=0), max_tokens=60
    )
    assert "Paris" in text
    assert reason in {"stop", "length"}


def test_greedy_output_is_deterministic(smollm2_engine: Engine) -> None:
    prompt = smollm2_engine.chat_prompt([{"role": "user", "content": "Tell me about the sea."}])
    first = generate(smollm2_engine, prompt, sampling=GREEDY, max_tokens=40)
    second = generate(smollm2_engine, prompt, sampling=GREEDY, max_tokens=40)
    assert first == second
    assert len(first[0]) > 20


def test_same_seed_same_sample_and_other_seed_differs(smollm2_engine: Engine) -> None:
    prompt = smollm2_engine.chat_prompt([{"role": "user", "content": "Write a poem about rain."}])
    hot = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    seeded = [
        generate(smollm2_engine, prompt, sampling=SamplingParams(seed=seed, **hot), max_tokens=30)[0]
        for seed in (7, 7, 8)
    ]  # type: ignore[arg-type]
    assert seeded[0] == seeded[1]
    assert seeded[0] != seeded[2]


def test_max_tokens_counts_tokens(smollm2_engine: Engine) -> None:
    request = GenerationRequest(tuple(smollm2_engine.chat_prompt(QUESTION)), GREEDY, max_tokens=5, ignore_eos=True)
    generation = smollm2_engine.generate(request)
    list(generation)
    assert generation.result.completion_tokens == 5
    assert generation.result.finish_reason == "length"


def test_stop_string_spanning_tokens_is_cut(smollm2_engine: Engine) -> None:
    prompt = smollm2_engine.chat_prompt([{"role": "user", "content": "Describe a forest in three sentences."}])
    full, _ = generate(smollm2_engine, prompt, sampling=GREEDY, max_tokens=60)
    tokens = smollm2_engine.model.tokenize(full, add_special=False, parse_special=False)
    pieces = [smollm2_engine.model.token_bytes(token).decode("utf-8", "replace") for token in tokens]
    # A stop string made of the end of token 5 and the start of token 6 spans a token boundary.
    boundary = len("".join(pieces[:6]))
    stop = full[boundary - 2 : boundary + 3]
    assert stop and full.find(stop) <= boundary - 2
    text, reason = generate(smollm2_engine, prompt, sampling=GREEDY, max_tokens=60, stop=(stop, "never-appears"))
    assert reason == "stop"
    assert text == full[: full.find(stop)]
    assert stop not in text


def test_prompt_longer_than_context_is_an_error(tiny_model: Path) -> None:
    with Engine(tiny_model, LoadOptions(n_ctx=64)) as engine:
        prompt = engine.raw_prompt("word " * 200)
        with pytest.raises(PromptTooLong, match=rf"the prompt is {len(prompt)} tokens but the context is 64 tokens"):
            engine.generate(GenerationRequest(tuple(prompt)))


def test_generation_stops_when_the_context_is_full(tiny_model: Path) -> None:
    with Engine(tiny_model, LoadOptions(n_ctx=64)) as engine:
        prompt = engine.raw_prompt("hello there")
        generation = engine.generate(GenerationRequest(tuple(prompt), GREEDY, ignore_eos=True))
        list(generation)
        result = generation.result
        assert result.context_full and result.finish_reason == "length"
        # 64 tokens fill the cache; the last sampled token is returned without being decoded.
        assert result.prompt_tokens + result.completion_tokens == 64 + 1


def test_two_sequences_in_one_context_match_each_alone(smollm2: Path) -> None:
    """One request is one sequence among N: batching two must not change either answer."""
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_slots=2)) as engine:
        prompts = [
            engine.chat_prompt([{"role": "user", "content": "Name three fruits."}]),
            engine.chat_prompt([{"role": "user", "content": "What is two plus two?"}]),
        ]
        alone = [generate(engine, prompt, sampling=GREEDY, max_tokens=24)[0] for prompt in prompts]
        generations = [engine.generate(GenerationRequest(tuple(p), GREEDY, max_tokens=24)) for p in prompts]
        scheduler = engine.scheduler
        while scheduler.has_work:
            assert len(scheduler.running) <= 2
            scheduler.step()
        together = [generation.result.text for generation in generations]
        assert together == alone


def test_an_unrelated_request_leaves_another_conversations_cache_alone(smollm2: Path) -> None:
    """A request sharing nothing with any slot takes the slot used least recently, not one whose cache holds a
    conversation: that conversation's next turn is still evaluated only from where it left off."""
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_slots=2)) as engine:
        turn = [{"role": "user", "content": "Tell me about the history of lighthouses on rocky coasts."}]
        first = engine.chat_prompt(turn)
        answer, _ = generate(engine, first, sampling=GREEDY, max_tokens=8)
        generate(engine, [engine.model.bos_token, *range(300, 340)], sampling=GREEDY, max_tokens=4)
        follow_up = engine.chat_prompt([*turn, {"role": "assistant", "content": answer},
                                        {"role": "user", "content": "And in winter?"}])  # fmt: skip
        generation = engine.generate(GenerationRequest(tuple(follow_up), GREEDY, max_tokens=2))
        list(generation)
        assert generation.result.cached_tokens >= len(first) - 2


def _busy_slots(engine: Engine) -> list[int]:
    return sorted(sequence.slot for sequence in engine.scheduler.running)


def test_a_new_request_takes_a_slot_next_to_the_running_ones_and_copies_its_cached_prefix(smollm2: Path) -> None:
    """llama.cpp decodes a run of consecutive slots in one pass and each run apart in another: a request joins
    the running ones next to them, even when another slot holds the start of its prompt (those cells are copied)."""
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_slots=4)) as engine:
        scheduler = engine.scheduler
        conversation = [{"role": "user", "content": "Tell me about the history of lighthouses on rocky coasts."}]
        first = engine.chat_prompt(conversation)
        generate(engine, first, sampling=GREEDY, max_tokens=4)  # its cache stays in slot 0
        generate(engine, [engine.model.bos_token, *range(300, 340)], sampling=GREEDY, max_tokens=4)  # slot 1
        follow_up = engine.chat_prompt([*conversation, {"role": "assistant", "content": "They guided ships."},
                                        {"role": "user", "content": "And in winter?"}])  # fmt: skip
        alone, _ = generate(engine, follow_up, sampling=GREEDY, max_tokens=12, ignore_eos=True)

        # An unrelated answer runs in slot 2 (the one used least recently), then the follow-up arrives.
        other = engine.generate(GenerationRequest(tuple(range(400, 440)), GREEDY, max_tokens=40, ignore_eos=True))
        scheduler.step()
        assert _busy_slots(engine) == [2]
        generation = engine.generate(GenerationRequest(tuple(follow_up), GREEDY, max_tokens=12, ignore_eos=True))
        scheduler.step()
        busy = _busy_slots(engine)
        assert len(busy) == 2 and busy[1] == busy[0] + 1
        text = "".join(generation)
        assert generation.result.cached_tokens >= len(first) - 2
        assert text == alone
        list(other)


def test_short_prompts_arriving_together_share_decodes_and_answer_as_alone(smollm2: Path) -> None:
    """Five prompts of different lengths admitted at once are evaluated in shared decodes (each slot the same
    number of tokens in each), not five decodes, and every greedy answer is the one it gets alone."""
    questions = ("Name three fruits.", "What is two plus two?", "Describe the sea in one sentence.",
                 "Why is the sky blue? Answer briefly.", "Name a planet.")  # fmt: skip
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_slots=5)) as engine:
        prompts = [engine.raw_prompt(f"Q: {question}\nA:") for question in questions]  # sharing no prefix
        assert len({len(prompt) for prompt in prompts}) >= 3
        alone = [generate(engine, prompt, sampling=GREEDY, max_tokens=24, ignore_eos=True)[0] for prompt in prompts]
        engine.clear_memory()  # nothing from the runs above is reused
        generations = [engine.generate(GenerationRequest(tuple(prompt), GREEDY, max_tokens=24, ignore_eos=True))
                       for prompt in prompts]  # fmt: skip
        scheduler = engine.scheduler
        scheduler._admit()
        plans = scheduler._plan()
        assert len(plans) < len(prompts) and max(len(plan) for plan in plans) == len(prompts)
        for plan in plans:
            assert len({end - begin for _, begin, end in plan}) == 1  # the same number of tokens for each slot
        while scheduler.has_work:
            scheduler.step()
        assert [generation.result.text for generation in generations] == alone


def test_an_answer_moves_to_close_a_gap_between_busy_slots(smollm2: Path) -> None:
    """When an answer between two running ones ends, the one in the highest slot moves into the gap (its KV cells
    copied), so the rest decode in one pass; its answer is the same as alone."""
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_slots=4)) as engine:
        scheduler = engine.scheduler
        prompts = [engine.chat_prompt([{"role": "user", "content": question}])
                   for question in ("Name three fruits.", "What is two plus two?", "Describe the sea.")]  # fmt: skip
        alone = [generate(engine, prompt, sampling=GREEDY, max_tokens=40, ignore_eos=True)[0] for prompt in prompts]
        lengths = (40, 3, 40)
        generations = [engine.generate(GenerationRequest(tuple(prompt), GREEDY, max_tokens=length, ignore_eos=True))
                       for prompt, length in zip(prompts, lengths, strict=True)]  # fmt: skip
        while scheduler.has_work:
            scheduler.step()
            busy = _busy_slots(engine)
            if scheduler.waiting or not busy:
                continue
            if scheduler.moves:  # after the move, the busy slots are a run again
                assert busy == list(range(busy[0], busy[0] + len(busy)))
        assert scheduler.moves == 1
        texts = [generation.result.text for generation in generations]
        assert texts[0] == alone[0] and texts[2] == alone[2]
        assert alone[1].startswith(texts[1])


def test_a_slot_being_copied_from_is_not_overwritten_from_host_memory_first(smollm2: Path) -> None:
    """A copies its prefix from slot 0, then B takes slot 0 in the same step and has a saved cache for its prompt:
    llama.cpp copies slot 0 at the next decode, so restoring B's cache into it first would give A B's cells."""
    texts = ("The history of lighthouses on rocky coasts is long, and the keepers who lived in them kept the lamps "
             "burning through every storm of the winter, trimming wicks and polishing the great lenses by hand.",
             "Bees make honey from the nectar of the flowers they visit; back in the hive they pass it from mouth "
             "to mouth, fan it with their wings until it thickens, and seal it in cells of wax they build themselves.",
             "On a winter morning in a mountain village, smoke rises from every chimney, the baker opens his shutters "
             "before dawn, and children drag their sleds up the steep lane behind the church to the top.")  # fmt: skip
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_slots=1)) as fresh:
        p, s, v = (fresh.raw_prompt(f"{text} {text}") for text in texts)
        a, b = [*p, *fresh.raw_prompt(" And then?")], [*s, *fresh.raw_prompt(" And the queen?")]
        alone = [generate(fresh, prompt, sampling=GREEDY, max_tokens=16, ignore_eos=True)[0] for prompt in (a, b)]
    assert min(len(p), len(s), len(v)) > 64
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_slots=3, host_cache_mb=64)) as engine:
        scheduler = engine.scheduler
        for prompt in (p, s, v):  # slots 0, 1, 2
            generate(engine, prompt, sampling=GREEDY, max_tokens=1)
        generate(engine, [*s[:20], *range(500, 540)], sampling=GREEDY, max_tokens=1)  # slot 1: s is saved to host
        assert scheduler.host_cache is not None and len(scheduler.host_cache.entries) == 1
        running = engine.generate(GenerationRequest((*v[:20], *range(600, 640)), GREEDY, max_tokens=40,
                                                    ignore_eos=True))  # fmt: skip
        scheduler.step()
        assert [sequence.slot for sequence in scheduler.running] == [2]
        generations = [engine.generate(GenerationRequest(tuple(prompt), GREEDY, max_tokens=16, ignore_eos=True))
                       for prompt in (a, b)]  # fmt: skip
        scheduler.step()  # a takes slot 1 and copies p from slot 0; b takes slot 0
        assert [sequence.slot for sequence in scheduler.running] == [2, 1, 0]
        list(running)
        assert [generation.result.text for generation in generations] == alone
        assert generations[0].result.cached_tokens >= len(p) - 2


@pytest.mark.parametrize("host_cache_mb", [0, 64])
def test_a_conversation_whose_slot_was_taken_gets_its_cache_back_from_host_memory(
    smollm2: Path, host_cache_mb: int
) -> None:
    """One slot, two conversations taking turns: with a host cache, each next turn is evaluated only from where
    it left off, and answers as it would have from scratch."""
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_slots=1, host_cache_mb=host_cache_mb)) as engine:
        turn = [{"role": "user", "content": "Tell me about the history of lighthouses on rocky coasts, please."}]
        first = engine.chat_prompt(turn)
        answer, _ = generate(engine, first, sampling=GREEDY, max_tokens=48, ignore_eos=True)
        other = [{"role": "user", "content": "Write a limerick about a cat who sails the sea in a teacup."}]
        generate(engine, engine.chat_prompt(other), sampling=GREEDY, max_tokens=48, ignore_eos=True)
        follow_up = engine.chat_prompt([*turn, {"role": "assistant", "content": answer},
                                        {"role": "user", "content": "And in winter?"}])  # fmt: skip
        generation = engine.generate(GenerationRequest(tuple(follow_up), GREEDY, max_tokens=6))
        text = "".join(generation)
        if host_cache_mb:
            assert generation.result.cached_tokens >= len(first) - 2
            assert engine.scheduler.host_cache is not None and engine.scheduler.host_cache.used > 0
        else:
            assert generation.result.cached_tokens < len(first) - 2  # at most the system prompt of the template
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_slots=1)) as fresh:
        assert generate(fresh, follow_up, sampling=GREEDY, max_tokens=6)[0] == text


def test_utf8_split_across_byte_tokens_round_trips(tiny_engine: Engine) -> None:
    text = "naïve café — 日本語のテキスト 😀🎉 done"
    tokens = tiny_engine.model.tokenize(text, add_special=False, parse_special=False)
    assert len(tokens) > len(text)  # multi-byte characters are split over several byte tokens
    stream = Utf8Stream()
    decoded = "".join(stream.feed(tiny_engine.model.token_bytes(token)) for token in tokens) + stream.flush()
    assert decoded == text


def test_utf8_stream_holds_back_partial_characters() -> None:
    stream = Utf8Stream()
    emoji = "😀".encode()
    assert stream.feed(emoji[:2]) == ""
    assert stream.feed(emoji[2:] + b"!") == "😀!"


def test_stop_matcher_holds_back_a_possible_start() -> None:
    matcher = StopMatcher(("</end>",))
    assert matcher.feed("hello </") == "hello "
    assert matcher.feed("e") == ""
    assert matcher.feed("x") == "</ex"
    assert matcher.feed(" and </en") == " and "
    assert matcher.feed("d> tail") == ""
    assert matcher.stopped


def test_stop_matcher_flushes_unfinished_prefix() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("abc ST") == "abc "
    assert matcher.flush() == "ST"
    assert not matcher.stopped


def test_context_size_is_training_context_when_it_fits() -> None:
    choice = choose_context_size(None, n_ctx_train=8192, kv_bytes_per_token=23_040, available_bytes=8 * 2**30)
    assert choice.n_ctx == 8192


def test_context_size_is_capped_to_fit_memory() -> None:
    choice = choose_context_size(None, n_ctx_train=131072, kv_bytes_per_token=131072, available_bytes=4 * 2**30)
    assert choice.n_ctx == 16384  # half of 4 GiB / 128 KiB per token
    assert "--ctx" in choice.reason


def test_context_size_requested_wins() -> None:
    assert choose_context_size(4096, n_ctx_train=2048, kv_bytes_per_token=1, available_bytes=1).n_ctx == 4096


def test_chat_template_runs_sandboxed() -> None:
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidModelFile, match="chat template"):
        render_chat(hostile, QUESTION, bos_token="", eos_token="")


def test_chat_template_can_raise_its_own_errors() -> None:
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    with pytest.raises(InvalidModelFile, match="system first"):
        render_chat(template, QUESTION, bos_token="", eos_token="")


def test_a_conversation_evaluates_only_the_new_tokens_each_turn(smollm2: Path) -> None:
    """The KV cache is kept between turns: turn 5 evaluates its new message, not the whole conversation."""
    questions = ["Name a fruit.", "What colour is it?", "Where does it grow?", "Is it sweet?", "Say thanks."]
    messages: list[dict[str, str]] = []
    with Engine(smollm2, LoadOptions(n_ctx=4096)) as engine:
        previous_prompt: list[int] = []
        for turn, question in enumerate(questions, start=1):
            messages.append({"role": "user", "content": question})
            prompt = engine.chat_prompt(messages)
            generation = engine.generate(GenerationRequest(tuple(prompt), GREEDY, max_tokens=24))
            answer = "".join(generation)
            result = generation.result
            if turn == 1:
                assert result.cached_tokens == 0
            else:
                new_turn = engine.model.tokenize(
                    f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                    add_special=False,
                    parse_special=True,
                )
                assert result.cached_tokens >= len(previous_prompt)  # everything before, and the last answer
                assert result.evaluated_prompt_tokens <= len(new_turn) + 2
            previous_prompt = prompt
            messages.append({"role": "assistant", "content": answer})
        assert result.prompt_tokens > 100 and result.evaluated_prompt_tokens < 25


def test_a_different_prompt_reuses_only_the_shared_start(smollm2_engine: Engine) -> None:
    first = smollm2_engine.chat_prompt([{"role": "user", "content": "Tell me about cats."}])
    second = smollm2_engine.chat_prompt([{"role": "user", "content": "Tell me about dogs."}])
    generate(smollm2_engine, first, sampling=GREEDY, max_tokens=4)
    shared = next(index for index, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    generation = smollm2_engine.generate(GenerationRequest(tuple(second), GREEDY, max_tokens=4))
    reused_text = "".join(generation)
    assert generation.result.cached_tokens == shared
    # Reuse must not change the answer: the same prompt in a fresh context gives the same text.
    with Engine(smollm2_engine.model.path, LoadOptions(n_ctx=2048)) as fresh:
        assert generate(fresh, second, sampling=GREEDY, max_tokens=4)[0] == reused_text


def test_llama_cpps_pick_checked_by_the_grammar_matches_the_general_path_with_penalties(smollm2_engine: Engine) -> None:
    """sample() lets llama.cpp pick in C and the grammar check it; a refused pick must leave no trace in the
    penalty sampler's history: step by step, on real logits, it picks what sample_constrained() picks."""
    import ctypes

    import numpy as np

    from llmrun.engine.native import llama_cpp
    from llmrun.engine.sampling import SamplerChain, json_schema_grammar

    model = smollm2_engine.model
    tags = {"type": "array", "items": {"type": "string"}, "maxItems": 3}
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "tags": tags},
              "required": ["name", "tags"]}  # fmt: skip
    params = SamplingParams(temperature=0, repeat_penalty=1.5, grammar=json_schema_grammar(schema))
    fast = SamplerChain(params, model.n_vocab, model.vocab)
    general = SamplerChain(params, model.n_vocab, model.vocab)
    smollm2_engine.clear_memory()
    smollm2_engine.decode(smollm2_engine.chat_prompt([{"role": "user", "content": "A person as JSON, please."}]))
    swaps = 0
    try:
        for _ in range(40):
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(smollm2_engine.ctx, -1), shape=(model.n_vocab,)
            )
            kept = logits.copy()
            handle = fast.handle
            token = fast.sample(smollm2_engine.ctx, -1)
            swaps += fast.handle != handle
            assert token == general.sample_constrained(kept.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
            if model.is_end_of_generation(token):
                break
            smollm2_engine.decode([token])
    finally:
        fast.close()
        general.close()
        smollm2_engine.clear_memory()
    assert swaps > 0  # the grammar refused llama.cpp's pick at least once


@pytest.mark.parametrize("boost", [0.0, 4.0])
def test_grammar_checked_after_the_pick_gives_the_grammar_first_greedy_token(
    smollm2_engine: Engine, boost: float
) -> None:
    """The grammar checks the chain's pick, not the whole vocabulary; greedy, the token is the best one it allows.

    Random logits, with (boost) or without the allowed tokens among the likeliest: the reference masks every
    token the grammar refuses and takes the best left.
    """
    import ctypes

    import numpy as np

    from llmrun.engine.native import llama_cpp
    from llmrun.engine.sampling import SamplerChain, grammar_sampler, json_schema_grammar

    model = smollm2_engine.model
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
              "age": {"type": "integer"}, "tags": {"type": "array", "items": {"enum": ["a", "bc"]}}},
              "required": ["name", "age", "tags"]}  # fmt: skip
    grammar = json_schema_grammar(schema)
    chain = SamplerChain(SamplingParams(temperature=0, repeat_penalty=1.0, grammar=grammar), model.n_vocab, model.vocab)
    reference = grammar_sampler(model.vocab, grammar)
    everything = (llama_cpp.llama_token_data * model.n_vocab)()
    view = np.ctypeslib.as_array(everything)
    rng = np.random.default_rng(7)
    produced = []
    try:
        for _ in range(60):
            logits = rng.normal(size=model.n_vocab).astype(np.float32)
            view["id"], view["logit"], view["p"] = np.arange(model.n_vocab), logits, 0.0
            array = llama_cpp.llama_token_data_array(everything, model.n_vocab, -1, False)
            llama_cpp.llama_sampler_apply(reference, ctypes.byref(array))
            allowed = np.isfinite(view["logit"])
            if not allowed.any():
                break  # the JSON is complete
            logits[allowed & (rng.random(model.n_vocab) < 0.5)] += boost
            expected = int(np.flatnonzero(allowed)[np.argmax(logits[allowed])])
            token = chain.sample_constrained(logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
            assert token == expected
            llama_cpp.llama_sampler_accept(reference, token)
            produced.append(token)
    finally:
        chain.close()
        llama_cpp.llama_sampler_free(reference)
    assert len(produced) > 10


def test_every_worker_computes_on_one_thread(tiny_model: Path) -> None:
    """Two models served at once take turns on one thread: llama.cpp's OpenMP keeps a team of threads per
    thread that ever decoded, and a second team on a small machine slowed every decode (see engine.worker)."""
    import threading

    from llmrun.engine.worker import EngineWorker, SequenceUpdate

    workers = [EngineWorker(Engine(tiny_model, LoadOptions(n_ctx=256)), f"tiny{n}") for n in range(2)]
    try:
        done = [threading.Event() for _ in workers]
        texts: list[list[str]] = [[], []]
        threads: set[str] = set()

        def receiver(index: int) -> object:
            def on_update(update: SequenceUpdate) -> None:
                threads.add(threading.current_thread().name)
                texts[index].append(update.text)
                if update.last:
                    done[index].set()

            return on_update

        for index, worker in enumerate(workers):
            request = GenerationRequest((1, 2, 3), GREEDY, max_tokens=8, ignore_eos=True)
            worker.submit(request, receiver(index))  # type: ignore[arg-type]
        assert all(event.wait(60) for event in done)
        assert threads == {"llmrun-engines"}
        assert all("".join(parts) for parts in texts)
    finally:
        for worker in workers:
            worker.stop()


def test_a_worker_gathers_streamed_text_for_its_interval_and_sends_the_first_and_the_end_at_once(smollm2: Path) -> None:
    """Each hand-off wakes the server's event loop, which takes its turn from the decode on a busy CPU (see
    EngineWorker): text is gathered for the interval, but the first text and the end never wait."""
    import threading
    import time

    from llmrun.engine.worker import EngineWorker, SequenceUpdate

    def answer(interval_s: float) -> tuple[list[tuple[float, SequenceUpdate]], float]:
        worker = EngineWorker(Engine(smollm2, LoadOptions(n_ctx=512)), "smollm2", stream_interval_s=interval_s)
        updates: list[tuple[float, SequenceUpdate]] = []
        done = threading.Event()

        def on_update(update: SequenceUpdate) -> None:
            updates.append((time.perf_counter(), update))
            if update.last:
                done.set()

        try:
            prompt = tuple(worker.engine.chat_prompt([{"role": "user", "content": "Tell me about the sea."}]))
            began = time.perf_counter()
            worker.submit(GenerationRequest(prompt, GREEDY, max_tokens=24, ignore_eos=True), on_update)
            assert done.wait(120)
            return updates, time.perf_counter() - began
        finally:
            worker.stop()

    each, _ = answer(0.0)
    gathered, elapsed = answer(0.5)
    assert "".join(update.text for _, update in each) == "".join(update.text for _, update in gathered)
    assert len(each) >= 20  # a hand-off per token (English text: nearly every token is text)
    first_at, first = gathered[0]
    assert first.text and not first.last  # the first text went at once, not with the rest
    assert len(gathered) <= 2 + elapsed / 0.5
    middle = [at for at, update in gathered[1:] if not update.last]
    assert all(later - earlier >= 0.45 for earlier, later in zip([first_at, *middle], middle, strict=False))


def test_a_worker_wakes_a_receiver_once_for_all_the_answers_of_a_step(smollm2: Path) -> None:
    """Answers sharing an ``on_handed`` (the server's event loop) get it once per step, after all their updates."""
    import threading

    from llmrun.engine.worker import EngineWorker, SequenceUpdate

    worker = EngineWorker(Engine(smollm2, LoadOptions(n_ctx=512, n_slots=3)), "smollm2")
    events: list[str] = []
    done = [threading.Event() for _ in range(3)]

    def receiver(index: int) -> object:
        def on_update(update: SequenceUpdate) -> None:
            events.append(f"update {index}")
            if update.last:
                done[index].set()

        return on_update

    def woken() -> None:
        events.append("woken")

    try:
        prompts = [worker.engine.chat_prompt([{"role": "user", "content": topic}]) for topic in ("Sea", "Sky", "Sun")]
        for index, prompt in enumerate(prompts):
            request = GenerationRequest(tuple(prompt), GREEDY, max_tokens=16, ignore_eos=True)
            worker.submit(request, receiver(index), woken)  # type: ignore[arg-type]
        assert all(event.wait(120) for event in done)
    finally:
        worker.stop()
    updates = [event for event in events if event != "woken"]
    assert len(updates) >= 3 * 15
    assert events[-1] == "woken"  # nothing handed over is left without its wake-up
    assert events.count("woken") <= len(updates) / 2  # one for the three answers of a step, not one each
    assert "woken" not in {events[i] for i in range(1, len(events)) if events[i - 1] == "woken"}  # never twice in a row
