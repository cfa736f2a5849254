"""The serving engine against PEFT's own reference, per method, plus the adapter cache and load errors."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from adapters.data import encode_dataset, parse_jsonl
from adapters.engine import AdapterLoadError, AdapterRef, AdapterState, BaseRuntime, SamplingParams
from adapters.methods import METHODS, ServingKind
from tests.budgets import UNLESS_BROKEN
from tests.conftest import chat_lines
from workers.training.checkpoints import save_adapter
from workers.training.loop import TrainingConfig, TrainingRecipe

BASE_INFO = {"linear_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             "default_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
PROMPT = "Say hi 12345, please, and then tell me a long story."


class _Settings:
    max_lora_rank = 64
    max_seq_length_limit = 4096



@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_tokenizer: Any) -> dict[str, Path]:
    """One adapter per registered method, trained briefly with a high learning rate (non-trivial weights)."""
    examples = encode_dataset(tiny_tokenizer, parse_jsonl(chat_lines(8).encode(), max_examples=100))
    out: dict[str, Path] = {}
    for name, method in METHODS.items():
        hp = method.resolve({"learning_rate": 0.05, "n_epochs": 2, "batch_size": 4}, n_examples=8,
                            settings=_Settings(), base_info=BASE_INFO)
        model, _ = TrainingRecipe(TrainingConfig(method=method, hyperparameters=hp, seed=3,
                                                 pad_id=tiny_tokenizer.pad_token_id),
                                  base_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                  train_examples=examples).run()
        folder = tmp_path_factory.mktemp(name)
        save_adapter(model, folder, method)
        out[name] = folder
    return out


def make_runtime(tiny_model_dir: Path, tokenizer: Any, slots: int, **options: Any) -> BaseRuntime:
    return BaseRuntime(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, cache_size=slots,
                       max_rank=64, **options)


@pytest.fixture()
def runtime(tiny_model_dir: Path, tiny_tokenizer: Any) -> Iterator[BaseRuntime]:
    runtime = make_runtime(tiny_model_dir, tiny_tokenizer, slots=4)
    yield runtime
    runtime.close()


def reference(tiny_model_dir: Path, folder: Path) -> Any:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder))
    return model.eval()


def prompt_ids(runtime: BaseRuntime) -> list[int]:
    return runtime.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_logits_and_greedy_tokens_match_peft(method: str, trained: dict[str, Path], runtime: BaseRuntime,
                                             tiny_model_dir: Path) -> None:
    ids = prompt_ids(runtime)
    adapter = runtime.adapters.load(AdapterRef(key=method, folder=trained[method], base_model="tiny"))
    peft_model = reference(tiny_model_dir, trained[method])
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    ours = runtime.logits(ids, adapter)
    expected_logits = expected.logits[0, -len(ids):]  # virtual-token methods also return their virtual positions
    assert torch.allclose(ours, expected_logits, atol=1e-4), (ours - expected_logits).abs().max()
    base = runtime.logits(ids, None)
    assert (ours - base).abs().max() > 1e-3, "the adapter must actually change the model"

    generated = runtime.generate(ids, adapter, SamplingParams(max_tokens=6, temperature=0)).token_ids
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(len(generated)):
            sequence.append(int(peft_model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    assert generated == sequence[len(ids):]


SLOT_METHODS = [name for name, m in METHODS.items() if m.serving_kind.uses_slot]


def test_rows_of_one_batch_use_their_own_adapters(trained: dict[str, Path], runtime: BaseRuntime) -> None:
    """The hooked projections route adapters per row: base rows and every slot method's rows in one pass."""
    ids = prompt_ids(runtime)
    keys: list[str | None] = [None, *SLOT_METHODS, SLOT_METHODS[0]]
    for key in SLOT_METHODS:
        runtime.adapters.load(AdapterRef(key=key, folder=trained[key], base_model="tiny"))
    slots = [0 if key is None else runtime.activate(key) for key in keys]
    batch = torch.tensor([ids] * len(keys))
    with torch.no_grad(), runtime.bank.route(slots):
        mixed = runtime.model(input_ids=batch).logits
    for row, slot in enumerate(slots):
        with torch.no_grad(), runtime.bank.route([slot]):
            single = runtime.model(input_ids=torch.tensor([ids])).logits[0]
        assert torch.allclose(mixed[row], single, atol=1e-5), row


def test_lru_evicts_and_reloads(trained: dict[str, Path], tiny_model_dir: Path, tiny_tokenizer: Any,
                                tmp_path: Path) -> None:
    runtime = make_runtime(tiny_model_dir, tiny_tokenizer, slots=2)
    ids = prompt_ids(runtime)
    copies = []
    for i in range(3):
        folder = tmp_path / f"copy{i}"
        shutil.copytree(trained["lora"], folder)
        copies.append(AdapterRef(key=f"a{i}", folder=folder, base_model="tiny"))
    first = runtime.logits(ids, runtime.adapters.load(copies[0]))
    runtime.adapters.load(copies[1])
    runtime.adapters.load(copies[0])  # touch: a1 is now the least recently used
    runtime.adapters.load(copies[2])
    assert runtime.adapters.in_memory_keys() == ["a0", "a2"]
    assert state(runtime, "a1") == AdapterState.ON_DISK and state(runtime, "a0") == AdapterState.ACTIVE
    # Memory holds two: a2 (least recently used, no slot) goes; a0 keeps its place because it holds a slot.
    reloaded = runtime.adapters.load(copies[1])
    assert runtime.adapters.in_memory_keys() == ["a0", "a1"]
    assert state(runtime, "a2") == AdapterState.ON_DISK
    assert torch.allclose(runtime.logits(ids, reloaded), first, atol=1e-6)
    assert state(runtime, "a1") == AdapterState.ACTIVE
    assert runtime.unload("a1") and not runtime.unload("a1")
    assert state(runtime, "a1") == AdapterState.ON_DISK


def state(runtime: BaseRuntime, key: str) -> AdapterState | None:
    residency = runtime.adapters.residency(key)
    return residency.state if residency is not None else None


def _broken_copy(source: Path, target: Path, *, config: dict[str, Any] | None = None,
                 weights: dict[str, torch.Tensor] | None = None, drop: str | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if config is not None:
        merged = {**json.loads((target / "adapter_config.json").read_text()), **config}
        (target / "adapter_config.json").write_text(json.dumps(merged))
    if weights is not None:
        tensors = load_file(str(target / "adapter_model.safetensors"))
        tensors.update(weights)
        save_file(tensors, str(target / "adapter_model.safetensors"))
    if drop:
        (target / drop).unlink()
    return target


def test_load_failures_are_clear_and_leave_the_server_serving(trained: dict[str, Path], runtime: BaseRuntime,
                                                              tmp_path: Path) -> None:
    lora = trained["lora"]
    key_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    key_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    cases = {
        "missing weights": (_broken_copy(lora, tmp_path / "m", drop="adapter_model.safetensors"),
                            "adapter_model.safetensors"),
        "unsupported type": (_broken_copy(lora, tmp_path / "t", config={"peft_type": "LOHA"}), "not supported"),
        "another method's weights": (_broken_copy(lora, tmp_path / "i", config={"peft_type": "IA3"}),
                                     "no IA³ vectors"),
        "rank too large": (_broken_copy(lora, tmp_path / "r", weights={
            key_a: torch.randn(128, 64), key_b: torch.randn(64, 128)}), "exceeds"),
        "wrong shapes": (_broken_copy(lora, tmp_path / "s", weights={
            key_a: torch.randn(8, 99), key_b: torch.randn(64, 8)}), "do not fit"),
        "unknown module": (_broken_copy(lora, tmp_path / "u", weights={
            "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.randn(8, 64),
            "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.randn(64, 8)}),
            "does not have"),
    }
    corrupt = _broken_copy(lora, tmp_path / "c")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    cases["corrupt weights"] = (corrupt, "safetensors")

    ids = prompt_ids(runtime)
    base_before = runtime.logits(ids, None)
    for case, (folder, fragment) in cases.items():
        with pytest.raises(AdapterLoadError, match=fragment):
            runtime.adapters.load(AdapterRef(key=case, folder=folder, base_model="tiny"))
        assert case not in runtime.adapters.in_memory_keys()
    # Nothing half-attached: the base model's outputs are untouched and a good adapter still loads.
    assert not runtime.bank.low_rank_slots and not runtime.bank.scaling_slots
    assert all(r.state == AdapterState.FAILED for r in runtime.adapters.residencies())
    assert torch.equal(runtime.logits(ids, None), base_before)
    runtime.adapters.load(AdapterRef(key="good", folder=lora, base_model="tiny"))


def test_sampling_is_seeded_and_stops(runtime: BaseRuntime) -> None:
    ids = prompt_ids(runtime)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    first = runtime.generate(ids, None, params)
    assert first.token_ids == runtime.generate(ids, None, params).token_ids
    assert len(first.token_ids) == 12 and first.finish_reason == "length"
    stop_at = runtime.tokenizer.decode(first.token_ids[3:5])
    if stop_at.strip():
        stopped = runtime.generate(ids, None, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11,
                                                             stop=[stop_at]))
        assert stopped.finish_reason == "stop" and stop_at not in stopped.text


def peft_greedy(model: Any, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and per-step last-position logits, by a full forward pass each step (no cache)."""
    sequence, logits = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            step = model(input_ids=torch.tensor([sequence])).logits[0, -1]
            logits.append(step)
            sequence.append(int(step.argmax()))
    return sequence[len(ids):], logits


@contextmanager
def scheduler_paused(runtime: BaseRuntime) -> Iterator[None]:
    """Hold the scheduler thread between two steps (inside a `call`) until the block ends."""
    entered, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=runtime.call, args=(lambda: (entered.set(), release.wait()),))
    holder.start()
    assert entered.wait(timeout=UNLESS_BROKEN)
    try:
        yield
    finally:
        release.set()
        holder.join(timeout=UNLESS_BROKEN)


def test_continuous_batch_of_mixed_adapters_matches_peft(trained: dict[str, Path], runtime: BaseRuntime,
                                                         tiny_model_dir: Path) -> None:
    """Base rows and rows of every registered method, with prompts of different lengths, decode in one batch;
    each row's logits at every step equal PEFT's for that adapter alone, and its greedy tokens match."""
    prompts = ["Hi", "Say hi 12345, please, and then tell me a long story.", "One two three four five six",
               "A much longer prompt than the others, so that the batch has rows of quite different lengths."]
    plan: list[tuple[str | None, str, int]] = [(None, prompts[0], 9), (None, prompts[1], 11)]
    for index, name in enumerate(METHODS):  # every method once, and the first two methods twice
        plan.append((name, prompts[index % len(prompts)], 5 + index))
    plan += [(name, prompts[(i + 2) % len(prompts)], 6) for i, name in enumerate(list(METHODS)[:2])]
    loaded = {key: runtime.adapters.load(AdapterRef(key=key, folder=trained[key], base_model="tiny"))
              for key in METHODS}
    sequences = []
    prefill_rows: list[int] = []  # rows of each prefill pass (input longer than one token)

    def record(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        if inputs.shape[1] > 1:
            prefill_rows.append(inputs.shape[0])

    hook = runtime.model.register_forward_pre_hook(record, with_kwargs=True)
    with scheduler_paused(runtime):  # every request waits, so all are admitted into the same running batch
        for key, prompt, n in plan:
            ids = runtime.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            sequences.append((key, ids, runtime.submit(ids, loaded.get(key) if key else None,
                                                       SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                                                       record_logits=True)))
    results = [(key, ids, seq, seq.wait()) for key, ids, seq in sequences]
    hook.remove()
    # Requests that wait together are prefilled together, left-padded (a KV prefix alone): all but those.
    kv_prefix_rows = sum(1 for key, _, _ in plan if key and METHODS[key].serving_kind is ServingKind.KV_PREFIX)
    assert max(prefill_rows) == len(plan) - kv_prefix_rows, prefill_rows
    references = {key: reference(tiny_model_dir, trained[key]) for key in loaded}
    references[None] = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # type: ignore[index]
    for key, ids, seq, result in results:
        assert len(result.token_ids) > 1, key
        expected_tokens, expected_logits = peft_greedy(references[key], ids, len(result.token_ids))
        assert result.token_ids == expected_tokens, key
        assert seq.logits is not None
        ours = [seq.logits[0][-1]] + [step[-1] for step in seq.logits[1:]]
        assert len(ours) == len(expected_logits)
        for step, (a, b) in enumerate(zip(ours, expected_logits, strict=True)):
            assert torch.allclose(a, b, atol=1e-4), (key, step, (a - b).abs().max())


def test_a_request_joins_a_running_batch_and_cancelled_rows_leave(trained: dict[str, Path],
                                                                   runtime: BaseRuntime) -> None:
    ids = prompt_ids(runtime)
    lora = runtime.adapters.load(AdapterRef(key="lora", folder=trained["lora"], base_model="tiny"))
    alone = runtime.generate(ids, lora, SamplingParams(max_tokens=30, temperature=0)).token_ids
    # Long enough (60 times the joiner's length, no early stop) to still be running when the joiner ends,
    # however slow this machine or late this thread gets the CPU back.
    room = runtime.model.config.max_position_embeddings - len(ids)
    long_running = runtime.submit(ids, None, SamplingParams(max_tokens=room, temperature=0, ignore_eos=True))
    first = long_running.events.get(timeout=UNLESS_BROKEN)  # the long request is decoding now
    assert first[0] == "delta"
    joined = runtime.submit(ids, lora, SamplingParams(max_tokens=30, temperature=0))
    assert joined.wait().token_ids == alone  # joined mid-flight, same result as alone
    assert long_running.finish_reason is None, "the long request ended before the joiner: the join was not tested"
    long_running.cancel()
    assert long_running.wait().finish_reason == "cancelled"
    deadline = time.monotonic() + UNLESS_BROKEN
    while runtime.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runtime.active == [] and runtime.batch.rows == 0


def test_streamed_text_equals_the_final_text(runtime: BaseRuntime) -> None:
    ids = prompt_ids(runtime)
    sequence = runtime.submit(ids, None, SamplingParams(max_tokens=20, temperature=0.7, seed=5))
    pieces = []
    stream = sequence.stream()
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as done:
            result = done.value
            break
    assert "".join(pieces) == result.text and len(result.token_ids) == 20


def test_torch_work_stays_on_the_scheduler_thread(trained: dict[str, Path], runtime: BaseRuntime) -> None:
    """Forward passes and slot writes requested from other threads (an API handler, the import smoke test)
    run on the scheduler thread: a second thread running torch kernels slows every decode step (OpenMP)."""
    threads: set[str] = set()
    hook = runtime.model.register_forward_pre_hook(lambda *_: threads.add(threading.current_thread().name))
    write = runtime.bank.write

    def recording_write(*args: Any, **kwargs: Any) -> None:
        threads.add(threading.current_thread().name)
        write(*args, **kwargs)

    runtime.bank.write = recording_write  # type: ignore[method-assign]
    ids = prompt_ids(runtime)
    lora = runtime.adapters.load(AdapterRef(key="lora", folder=trained["lora"], base_model="tiny"))
    caller = threading.Thread(target=lambda: (runtime.activate(lora), runtime.logits(ids, lora),
                                              runtime.generate(ids, lora, SamplingParams(max_tokens=3)),
                                              runtime.unload("lora")))
    caller.start()
    caller.join(timeout=UNLESS_BROKEN)
    hook.remove()
    assert not caller.is_alive()
    assert threads == {runtime.scheduler.name}
    assert state(runtime, "lora") == AdapterState.ON_DISK  # unloaded, through the scheduler thread too


def test_slots_grown_during_a_request_can_be_cleared_after_it(trained: dict[str, Path], runtime: BaseRuntime) -> None:
    """A request's prefill runs in inference mode; slot tensors it makes grow (a larger rank) or allocate
    (channel scales) must stay normal tensors, or the next unload outside inference mode fails."""
    ids = prompt_ids(runtime)
    for name in SLOT_METHODS:
        adapter = runtime.adapters.load(AdapterRef(key=name, folder=trained[name], base_model="tiny"))
        runtime.generate(ids, adapter, SamplingParams(max_tokens=2))
    assert runtime.bank.rank > 8, "some slot method should have needed a larger rank than the initial slots"
    for name in SLOT_METHODS:
        assert runtime.unload(name), name
        assert state(runtime, name) == AdapterState.ON_DISK


def test_a_request_that_cannot_get_a_slot_fails_after_the_bounded_wait(trained: dict[str, Path], tiny_model_dir: Path,
                                                                       tiny_tokenizer: Any, tmp_path: Path) -> None:
    """One slot, busy with a running request: a request for another adapter is refused once it has waited
    `slot_wait_seconds` for a slot (SlotUnavailable), instead of waiting for as long as the other one runs."""
    from adapters.engine import SlotUnavailable

    runtime = make_runtime(tiny_model_dir, tiny_tokenizer, slots=1, slot_wait_seconds=0.3)
    try:
        ids = prompt_ids(runtime)
        refs = []
        for i in range(2):
            shutil.copytree(trained["lora"], tmp_path / f"copy{i}")
            refs.append(AdapterRef(key=f"a{i}", folder=tmp_path / f"copy{i}", base_model="tiny"))
        first, second = (runtime.adapters.load(ref) for ref in refs)
        room = runtime.model.config.max_position_embeddings - len(ids)
        holder = runtime.submit(ids, first, SamplingParams(max_tokens=room, temperature=0, ignore_eos=True))
        assert holder.events.get(timeout=UNLESS_BROKEN)[0] == "delta"  # it holds the only slot now
        started = time.monotonic()
        waiting = runtime.submit(ids, second, SamplingParams(max_tokens=3))
        kind, error = waiting.events.get(timeout=UNLESS_BROKEN)
        assert kind == "error" and isinstance(error, SlotUnavailable), (kind, error)
        assert "slot" in str(error) and time.monotonic() - started >= 0.3
        assert holder.finish_reason is None  # the running request was not disturbed
        assert waiting not in runtime.pending
        holder.cancel()
        assert holder.wait().finish_reason == "cancelled"
    finally:
        runtime.close()


def test_admission_is_fair_across_tenants(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """Two batch rows, four long requests of tenant A queued before one short request of tenant B: B is admitted
    with A's first, not behind all of A's (first come, first served would make B wait for A's rows to end)."""
    fair = make_runtime(tiny_model_dir, tiny_tokenizer, slots=2, max_batch=2)
    try:
        ids = prompt_ids(fair)
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        with scheduler_paused(fair):
            a_rows = [fair.submit(ids, None, long, tenant="a") for _ in range(4)]
            b_row = fair.submit(ids, None, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                                tenant="b")
        b_row.wait()
        # B ran beside A's first row; A's third had to wait for a row of A to end.
        assert a_rows[0].produced and a_rows[2].last_token_at is None, [len(a.produced) for a in a_rows]
        for row in a_rows:
            row.cancel()
        for row in a_rows:
            row.wait()
    finally:
        fair.close()


# ------------------------------------------------------------------ sampling fields (issue 23, item 1)


def test_logprobs_are_the_log_softmax_of_peft_logits_for_an_adapter(trained: dict[str, Path], runtime: BaseRuntime,
                                                                     tiny_model_dir: Path) -> None:
    """Each generated token's logprob, and its alternatives, are the log-softmax of the logits the engine chose it
    from, which equal PEFT's for the adapter: prefill step and decode steps alike."""
    ids = prompt_ids(runtime)
    lora = runtime.adapters.load(AdapterRef(key="lora", folder=trained["lora"], base_model="tiny"))
    result = runtime.generate(ids, lora, SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True))
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids) == 5
    tokens, logits = peft_greedy(reference(tiny_model_dir, trained["lora"]), ids, 5)
    assert result.token_ids == tokens
    for entry, step in zip(result.logprobs, logits, strict=True):
        expected = torch.log_softmax(step.float(), dim=-1)
        assert abs(entry.logprob - float(expected[entry.token])) < 1e-4
        values, top = torch.topk(expected, 3)
        assert [token for token, _ in entry.top] == top.tolist()
        assert torch.allclose(torch.tensor([lp for _, lp in entry.top]), values, atol=1e-4)
        assert entry.top[0][0] == entry.token  # greedy: the chosen token is the most likely


def test_penalties_and_logit_bias_adjust_a_step_as_computed_by_hand(runtime: BaseRuntime) -> None:
    from adapters.engine import Sequence

    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                            logit_bias={7: 100.0, 9: -3.0}, temperature=0, logprobs=0)
    sequence = Sequence([1, 2], None, params, runtime.tokenizer)
    sequence.produced = [3, 3, 4]
    logits = torch.linspace(-5, 5, 16)
    expected = logits.clone()
    for token in (1, 2, 3, 4):  # the repetition penalty: prompt and generated tokens
        expected[token] = expected[token] / 2 if expected[token] > 0 else expected[token] * 2
    expected[3] -= 0.25 * 2 + 0.5
    expected[4] -= 0.25 * 1 + 0.5
    expected[7] += 100
    expected[9] -= 3
    assert torch.allclose(sequence.adjusted_logits(logits), expected)
    assert torch.equal(logits, torch.linspace(-5, 5, 16))  # the step's logits are left alone
    assert sequence.pick(logits) == 7  # the bias decides, and the logprob is that of the adjusted logits
    sequence.accept(7, set())
    assert sequence.logprobs is not None
    assert abs(sequence.logprobs[0].logprob - float(torch.log_softmax(expected, -1)[7])) < 1e-6
    following = sequence.adjusted_logits(logits)  # 7 now counts as generated: penalised like 4
    assert logits[7] < 0 and abs(float(following[7]) - (float(logits[7]) * 2 - 0.25 - 0.5 + 100)) < 1e-5


def test_logit_bias_forces_a_token_when_sampling(runtime: BaseRuntime) -> None:
    ids = prompt_ids(runtime)
    forced = runtime.tokenizer(" story", add_special_tokens=False)["input_ids"][0]
    result = runtime.generate(ids, None, SamplingParams(max_tokens=6, temperature=1.0, seed=1,
                                                        logit_bias={forced: 100.0}))
    assert result.token_ids == [forced] * 6


def test_n_choices_share_one_prefill_and_seeds_hold_in_any_batch_company(trained: dict[str, Path],
                                                                         runtime: BaseRuntime) -> None:
    """A request's n choices are prefilled as one row (their KV rows are copies), and a seeded sample gives the same
    tokens alone and in a batch with other requests (another adapter, other prompts)."""
    ids = prompt_ids(runtime)
    lora = runtime.adapters.load(AdapterRef(key="lora", folder=trained["lora"], base_model="tiny"))
    greedy = runtime.generate(ids, lora, SamplingParams(max_tokens=8, temperature=0)).token_ids
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=42)
    alone = runtime.generate(ids, lora, seeded).token_ids
    rows: list[int] = []

    def record(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs["input_ids"].shape[1] > 1:
            rows.append(kwargs["input_ids"].shape[0])

    hook = runtime.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with scheduler_paused(runtime):  # everything below is admitted in one prefill pass
            company = [runtime.submit(runtime.tokenizer(text, add_special_tokens=False)["input_ids"], adapter,
                                      SamplingParams(max_tokens=10, temperature=0.9, seed=index))
                       for index, (text, adapter) in enumerate([("Hi there", None), ("One two three", lora)])]
            choices = runtime.submit_choices(ids, lora, [SamplingParams(max_tokens=8, temperature=0)] * 3)
            again = runtime.submit(ids, lora, seeded)
        results = [choice.wait().token_ids for choice in choices]
        assert again.wait().token_ids == alone
        for other in company:
            other.wait()
    finally:
        hook.remove()
    assert results == [greedy] * 3
    assert rows[0] == 3, rows  # two company prompts, and one row for the 3 choices and the seeded request


def test_token_bytes_rebuild_text_split_inside_a_character(tiny_tokenizer: Any) -> None:
    """OpenAI's `bytes`: a token holding part of a character (an emoji split in two) gives its own bytes, so the
    tokens' bytes joined are the text's."""
    from adapters.engine import token_text

    text = "héllo “quoted” 😀"
    parts = [token_text(tiny_tokenizer, token) for token in tiny_tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert any("\ufffd" in part for part, _ in parts)  # the emoji is split across tokens
    assert bytes(byte for _, raw in parts for byte in raw).decode() == text
