"""One attempt at one claimed job (`JobRunner`): load the base model and the data, train with the runner's
methods as the loop's callbacks, publish checkpoints and the final adapter as servable adapters, and record
how the attempt ended.

Imports torch (through the training loop): only a pool process, never the Celery parent, imports this module.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select

from adapters.base_models import resolve_device
from adapters.compute import compute_plan
from adapters.data import EncodedExample, encode_any, parse_jsonl
from adapters.methods import METHODS
from adapters.methods.base import PREFERENCE_OBJECTIVES, ResolvedHyperparameters
from adapters.store import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_WEIGHTS, ArtifactStore
from app.db.models import Adapter, AdapterStatus, Checkpoint, FineTuningJob, JobStatus
from app.db.session import session_scope
from app.metrics import TRAINING_STEPS, TRAINING_TOKENS
from app.queue import enqueue_training
from app.services import base_models, jobs
from app.services.ids import new_id
from app.services.inference import adapter_by_name
from app.services.job_metrics import CURVES
from app.settings import get_settings
from workers import process
from workers.faults import FaultInjector
from workers.grading import grade_answers, graded_items
from workers.lease import Lease
from workers.training import checkpoints
from workers.training.batches import available
from workers.training.evaluation import answer_conversations, attention, model_metrics
from workers.training.loop import (
    BatchMaker,
    Cancelled,
    HandBack,
    LeaseLost,
    Paused,
    Position,
    TimeLimit,
    TrainingCallbacks,
    TrainingConfig,
    TrainingRecipe,
    accelerator_for,
    has_trained_tokens,
)
from workers.training.memory import plan_memory
from workers.training.parallel import Replicas, ReplicaSpec

log = logging.getLogger("adaptery.worker")

# The loop asks whether to stop and reports progress every step; steps can take milliseconds, so the job
# row is read (cancel / pause flags) and written (progress) at most this often, whatever the step time.
# A pause or cancel is therefore seen within about this long; the lease check is in memory, every step.
POLL_SECONDS = 1.0


class Throttle:
    """`due()` is true at most once per `seconds` (the first call always is)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._last: float | None = None

    def due(self) -> bool:
        moment = time.monotonic()
        if self._last is not None and moment - self._last < self.seconds:
            return False
        self._last = moment
        return True


class Curves:
    """A job's scalars as TensorBoard event files (one file per attempt; a resumed attempt may repeat the
    steps after its checkpoint, and readers keep the newest value of a step)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._writer: Any = None

    def write(self, metrics: dict[str, Any]) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.folder.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.folder), flush_secs=10)
        step = metrics["step"]
        for name in CURVES:
            if metrics.get(name) is not None:
                self._writer.add_scalar(name, metrics[name], step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class FromModelUnavailable(Exception):
    """The job's `from_model` is not (or no longer) one of its tenant's ready adapters; `code` and `param` are what
    the job's error shows (workers/tasks.py records them)."""

    code = "from_model_unavailable"
    param = "from_model"


class JobRunner:
    """Trains one claimed job once. `run()` returns the outcome: done, cancelled, paused, timeout,
    handed_back or lease_lost; an exception means the attempt failed (the Celery task records it)."""

    def __init__(self, job_id: str, *, owner: str, lease: Lease, claimed_at: float):
        self.job_id, self.owner, self.lease, self.claimed_at = job_id, owner, lease, claimed_at
        self.settings = get_settings()
        self.store = ArtifactStore.for_settings(self.settings)
        self.fault = FaultInjector.parse(self.settings.fault_injection)
        with session_scope() as session:
            job = session.get(FineTuningJob, job_id)
            assert job is not None
            session.expunge(job)
        self.job = job
        self.method_type = job.method["type"]
        self.method = METHODS[self.method_type]
        self.final_name = jobs.fine_tuned_model_name(job.model, job.suffix, job.id)
        self.checkpoint_root = self.store.checkpoint_dir(job_id)
        self.last_checkpoint_step = 0
        self._phase_started = time.perf_counter()
        self._stop_check = Throttle(POLL_SECONDS)
        self._progress_write = Throttle(POLL_SECONDS)
        self._unwritten_progress: tuple[int, int, float, float | None] | None = None
        self.curves = Curves(self.store.tensorboard_dir(job_id))

    # ------------------------------------------------------------------ the attempt

    def run(self) -> str:
        try:
            return self._attempt()
        finally:
            self.curves.close()

    def _attempt(self) -> str:
        torch.set_num_threads(self.settings.torch_threads)
        self._phase_started = time.perf_counter()
        source = self._from_model_source()  # before anything is loaded: a refused source fails the job at once
        spec = base_models.resolve(self.settings, self.job.model)
        plan = compute_plan(resolve_device(self.settings.device), self.settings.training_dtype,
                            self.settings.data_dir)
        self._event(f"Computing in {plan.reason}.", data={"compute_dtype": plan.dtype,
                                                          "fp32_gflops": plan.fp32_gflops,
                                                          "bf16_gflops": plan.bf16_gflops})
        tokenizer = base_models.load_tokenizer(self.settings, spec)
        base = base_models.load_model(self.settings, spec, dtype=plan.dtype)
        self._phase_done("load_base_model", f"Loaded base model {self.job.model} ({plan.dtype})")
        self._batching_event(base)
        train_examples, valid_examples = self._tokenise(tokenizer)
        self.store.fetch_checkpoint(self.job_id)  # another host may have trained this job until it stopped
        resume = checkpoints.latest(self.checkpoint_root)
        if resume is not None:
            self._event(f"Resuming from the checkpoint at step {resume.step}.",
                        data={"resumed_from_step": resume.step})
        hyperparameters = self.method.stored(self.job.method[self.method_type]["hyperparameters"])
        config = TrainingConfig(method=self.method, hyperparameters=hyperparameters, seed=self.job.seed,
                                pad_id=tokenizer.pad_token_id, compute_dtype=plan.dtype,
                                eval_every_steps=self.settings.eval_every_steps,
                                log_every_steps=self.settings.log_every_steps,
                                checkpoint_steps=self.settings.checkpoint_steps,
                                max_valid_examples=self.settings.validation_examples_per_eval)
        memory = plan_memory(base.config, device=base.device, compute_dtype=plan.dtype,
                             gradient_checkpointing=hyperparameters.gradient_checkpointing,
                             limit_mb=self.settings.training_memory_mb, fraction=self.settings.training_memory_fraction)
        replicas = self._replicas(spec, base, config, train_examples, resume, memory)
        try:
            with replicas as parallel:
                model, result = TrainingRecipe(
                    config, base_model=base, train_examples=train_examples, valid_examples=valid_examples,
                    callbacks=self.callbacks(), resume=resume, initial_weights=self._initial_weights(source),
                    memory=memory, parallel=parallel, after_step=self.fault.after_step).run()
        except LeaseLost:
            log.warning("job %s: lease lost to another worker; stopping without writing", self.job_id)
            return "lease_lost"
        except Cancelled:
            return self._cancelled()
        except Paused:
            return self._paused()
        except TimeLimit:
            return self._timed_out()
        except HandBack:
            return self._handed_back()
        self._write_progress()  # the last step's progress is written before the job can succeed
        if result.stopped_early:
            self._event(f"Early stopping: the validation loss did not improve in "
                        f"{hyperparameters.early_stopping_patience} validations; the fine-tuned model is the "
                        f"checkpoint at step {result.kept_step}.", data={"kept_step": result.kept_step})
        report = self._end_report(model, base, tokenizer, valid_examples, hyperparameters, result, plan.dtype)
        self._publish(model, self.final_name)
        with session_scope() as session:
            jobs.record_result(session, self.job_id, report, checkpoint_step=result.kept_step)
            jobs.mark_succeeded(session, self.job_id, fine_tuned_model=self.final_name,
                                trained_tokens=result.trained_tokens, owner=self.owner,
                                events=(f"New fine-tuned model created: {self.final_name}",
                                        "The job has successfully completed."))
        return "done"

    def _replicas(self, spec: Any, base: Any, config: TrainingConfig, train_examples: list[EncodedExample],
                  resume: Any, memory: Any) -> Any:
        """With ADAPTERY_TRAINING_PROCESSES > 1, the replica processes of a data-parallel job (this process is
        rank 0); otherwise nothing to start."""
        world = self.settings.training_processes
        if world <= 1:
            return nullcontext(None)
        device_type = base.device.type
        if device_type == "cuda" and world > torch.cuda.device_count():
            raise RuntimeError(f"ADAPTERY_TRAINING_PROCESSES={world} but this host has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
        where = f"cuda:0-{world - 1}" if device_type == "cuda" else "CPU (gloo)"
        self._event(f"Data parallel over {world} processes on {where}: each trains its share of every step, "
                    "gradients summed.", data={"training_processes": world, "device_type": device_type})
        return Replicas(ReplicaSpec(model_path=base_models.local_path(self.settings, spec), device_type=device_type,
                                    config=config, train_examples=train_examples,
                                    torch_threads=self.settings.torch_threads, resume=resume, memory=memory),
                        world)

    def callbacks(self) -> TrainingCallbacks:
        return TrainingCallbacks(on_metrics=self.on_metrics, on_progress=self.on_progress,
                                 should_stop=self.should_stop, on_checkpoint=self.on_checkpoint,
                                 on_message=self.on_message, on_info=self._event, on_step=self.on_step,
                                 on_training_start=self.on_training_start,
                                 restore_weights=self.restore_weights)

    def _from_model_source(self) -> Adapter | None:
        """The adapter the job's `from_model` names, resolved again now as the API did when the job was made: the
        job's own tenant's, by name (names are per tenant). Since then it may have been deleted, or the job may
        predate that rule and name another tenant's public adapter, whose weights it must never be given."""
        if not self.job.from_model:
            return None
        with session_scope() as session:
            source = adapter_by_name(session, tenant_id=self.job.tenant_id, name=self.job.from_model)
            if source is not None:
                session.expunge(source)
        if source is None:
            raise FromModelUnavailable(f"from_model '{self.job.from_model}' is not one of this tenant's fine-tuned "
                                       "models or checkpoints (any more); a job continues only its own tenant's.")
        return source

    def _initial_weights(self, source: Adapter | None) -> Any:
        """Loads the `from_model` adapter into the new adapter (None without one)."""
        if source is None:
            return None
        folder = self.store.fetch_adapter(source.id)

        def load(model: Any) -> None:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            saved_config = json.loads((folder / ADAPTER_CONFIG).read_text())
            tensors = self.method.adapter_to_continue(load_file(str(folder / ADAPTER_WEIGHTS)), saved_config)
            set_peft_model_state_dict(model, tensors)
            self._event(f"Starting from the weights of {self.job.from_model}.",
                        data={"from_model": self.job.from_model})

        return load

    def _end_report(self, model: Any, base: Any, tokenizer: Any, valid_examples: list[EncodedExample],
                    hp: ResolvedHyperparameters, result: Any, dtype: str) -> dict[str, Any]:
        """The job's result: the last training metrics and, with a validation file, every metric over the whole
        validation set for the fine-tuned model and for the base model on the same examples."""
        report: dict[str, Any] = {"step": result.kept_step, "stopped_early": result.stopped_early}
        report.update({k: v for k, v in result.last_metrics.items() if k.startswith("train_")})
        kept = [(record, example) for record, example in zip(self.valid_records, valid_examples, strict=True)
                if has_trained_tokens(example, hp.max_seq_length)]
        valid = [example for _, example in kept]
        if not valid:
            return report
        autocast = accelerator_for(dtype, next(base.parameters()).device).autocast
        if hp.objective == "kto":
            return report | self._feedback_report(model, valid, hp, tokenizer.pad_token_id, autocast)
        if hp.objective in PREFERENCE_OBJECTIVES:
            return report | self._preference_report(model, valid, hp, tokenizer.pad_token_id, autocast)
        common = {"base_model": base, "tokenizer": tokenizer, "examples": valid, "batch_size": hp.batch_size,
                  "autocast": autocast, "exact_match_examples": self.settings.exact_match_examples}
        started = time.perf_counter()
        answers: tuple[list[str], list[str]] = ([], [])  # the fine-tuned and the base model's, for the graders
        tuned = model_metrics(model, make=BatchMaker.for_training(self.method, hp, tokenizer.pad_token_id),
                              answers=answers[0], **common)
        with model.disable_adapter():
            plain = model_metrics(model.get_base_model(), make=BatchMaker.for_base_model(
                                      max_len=hp.max_seq_length, pad_id=tokenizer.pad_token_id),
                                  answers=answers[1], **common)
        report.update({"full_valid_loss": tuned["loss"], "full_valid_mean_token_accuracy": tuned["mean_token_accuracy"],
                       "full_valid_exact_match": tuned["exact_match"], "valid_examples": len(valid),
                       "exact_match_examples": tuned["exact_match_examples"],
                       "base_model": {"full_valid_loss": plain["loss"],
                                      "full_valid_mean_token_accuracy": plain["mean_token_accuracy"],
                                      "full_valid_exact_match": plain["exact_match"]}})
        if self.job.graders:
            try:
                tuned_grades, plain_grades = self._grades(model, base, tokenizer, [r for r, _ in kept], valid,
                                                           answers, hp.max_seq_length, autocast)
            except Exception as exc:  # the graders are the report's: their failure never costs the trained model
                log.warning("job %s: grading the end report failed", self.job_id, exc_info=True)
                report["grades_error"] = f"{type(exc).__name__}: {exc}"[:500]
            else:
                report["grades"] = tuned_grades
                report["base_model"]["grades"] = plain_grades
        seconds = time.perf_counter() - started

        def shown(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        self._event(f"Validation ({len(valid)} examples): loss {tuned['loss']:.4f} (base model "
                    f"{plain['loss']:.4f}), token accuracy {tuned['mean_token_accuracy']:.3f} (base "
                    f"{plain['mean_token_accuracy']:.3f}), exact match {shown(tuned['exact_match'])} (base "
                    f"{shown(plain['exact_match'])}); evaluated in {seconds:.1f} s.",
                    data={"phase": "end_report", "seconds": round(seconds, 2), **report})
        return report

    def _grades(self, model: Any, base: Any, tokenizer: Any, records: list[dict[str, Any]], valid: list[Any],
                answers: tuple[list[str], list[str]], max_len: int, autocast: Any) -> list[list[dict[str, Any]]]:
        """The job's graders over the fine-tuned and the base model's answers (a score_model grader scores with
        the base model: the adapter disabled)."""
        items = graded_items(records, valid, tokenizer, self.settings.exact_match_examples)

        def with_base_model(_: str, conversations: list[list[dict[str, str]]], max_tokens: int) -> list[str | None]:
            with model.disable_adapter(), attention(base, "sdpa"):
                return answer_conversations(model.get_base_model(), tokenizer, conversations,
                                            max_new_tokens=max_tokens, max_len=max_len, autocast=autocast)

        assert self.job.graders is not None
        return grade_answers(self.job.graders, items, list(answers), with_base_model)

    def _preference_report(self, model: Any, valid: list[Any], hp: ResolvedHyperparameters, pad_id: int,
                           autocast: Any) -> dict[str, Any]:
        """A preference job's figures over the whole validation file: the objective's loss, pairs ranked right and
        reward margin, and how often the fine-tuned model and the base model give the preferred answer the higher
        log-probability."""
        from workers.training.preference import preferred_share, score_pairs

        started = time.perf_counter()
        make = BatchMaker.for_training(self.method, hp, pad_id)
        # The base model reads the same rows with nothing in front of them (the attention the model is set to).
        base_make = BatchMaker(packed=make.packed, offset=0, max_len=hp.max_seq_length, pad_id=pad_id)
        with autocast():
            scores = score_pairs(model, valid, objective=hp.objective, make=make, reference_make=base_make,
                                 beta=float(hp.beta or 0.0), gamma=hp.gamma, batch_size=hp.batch_size)
            tuned = preferred_share(model, valid, make=make, batch_size=hp.batch_size)
            with model.disable_adapter():
                plain = preferred_share(model, valid, make=base_make, batch_size=hp.batch_size)
        report = {"full_valid_loss": round(scores.loss, 6), "full_valid_preference_accuracy": round(scores.accuracy, 6),
                  "full_valid_reward_margin": round(scores.reward_margin, 6),
                  "full_valid_chosen_logps": round(scores.chosen_logps, 4),
                  "full_valid_rejected_logps": round(scores.rejected_logps, 4),
                  "full_valid_prefers_preferred": round(tuned, 6), "valid_examples": len(valid),
                  "base_model": {"full_valid_prefers_preferred": round(plain, 6)}}
        return self._reported(f"Validation ({len(valid)} pairs): {hp.objective} loss {scores.loss:.4f}, reward margin "
                              f"{scores.reward_margin:.3f}, ranked right {scores.accuracy:.3f}; the preferred answer "
                              f"is the more likely one for {tuned:.3f} of the pairs (base model {plain:.3f})", report,
                              started)

    def _feedback_report(self, model: Any, valid: list[Any], hp: ResolvedHyperparameters, pad_id: int,
                         autocast: Any) -> dict[str, Any]:
        """A KTO job's figures over the whole validation file: the loss, the examples ranked right, the mean signed
        reward, and how far the good and the bad answers moved against the base model (mean log-ratios: the good
        ones should rise above 0, the bad ones fall below)."""
        from workers.training.preference import score_feedback

        started = time.perf_counter()
        make = BatchMaker.for_training(self.method, hp, pad_id)
        with autocast():
            scores = score_feedback(model, valid, make=make, reference_make=BatchMaker(
                                        packed=make.packed, offset=0, max_len=hp.max_seq_length, pad_id=pad_id),
                                    beta=float(hp.beta or 0.0), batch_size=hp.batch_size)

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        report = {"full_valid_loss": round(scores.loss, 6), "full_valid_preference_accuracy": round(scores.accuracy, 6),
                  "full_valid_reward_margin": round(scores.reward_margin, 6),
                  "full_valid_desirable_logratio": rounded(scores.desirable_logratio),
                  "full_valid_undesirable_logratio": rounded(scores.undesirable_logratio),
                  "valid_examples": len(valid)}
        return self._reported(f"Validation ({len(valid)} examples): kto loss {scores.loss:.4f}, ranked right "
                              f"{scores.accuracy:.3f}; log-ratio to the base model of the good answers "
                              f"{report['full_valid_desirable_logratio']}, of the bad ones "
                              f"{report['full_valid_undesirable_logratio']}", report, started)

    def _reported(self, text: str, report: dict[str, Any], started: float) -> dict[str, Any]:
        """The end report's event (`text` and how long the evaluation took), and the report."""
        seconds = time.perf_counter() - started
        self._event(f"{text}; evaluated in {seconds:.1f} s.",
                    data={"phase": "end_report", "seconds": round(seconds, 2), **report})
        return report

    def _tokenise(self, tokenizer: Any) -> tuple[list[Any], list[Any]]:
        """The training and validation examples: EncodedExamples, or PreferencePairs from a preference file."""
        limit = self.settings.max_examples_per_file
        train_examples = encode_any(tokenizer, parse_jsonl(self.store.read_file(self.job.training_file),
                                                           max_examples=limit))
        valid = parse_jsonl(self.store.read_file(self.job.validation_file), max_examples=limit) \
            if self.job.validation_file else None
        valid_examples = encode_any(tokenizer, valid) if valid is not None else []
        self.valid_records = valid.records if valid is not None else []  # the lines the end report's graders read
        tokens = sum(len(e.input_ids) for e in train_examples + valid_examples)
        self._phase_done("tokenise", f"Tokenised {len(train_examples)} training"
                         + (f" and {len(valid_examples)} validation" if self.job.validation_file else "")
                         + f" examples ({tokens} tokens)", examples=len(train_examples) + len(valid_examples),
                         tokens=tokens)
        return train_examples, valid_examples

    # ------------------------------------------------------------------ the loop's callbacks

    def on_training_start(self) -> None:
        self._phase_done("prepare_training", f"Built the {self.method_type} adapter and its optimiser")
        seconds = round(time.perf_counter() - self.claimed_at, 2)
        self._event(f"Start-up took {seconds:.2f} s; training begins.", data={"phase": "start_up", "seconds": seconds})

    def on_step(self, step: int, tokens: int) -> None:
        TRAINING_TOKENS.labels(self.job.model).inc(tokens)
        TRAINING_STEPS.labels(self.job.model).inc()

    def on_metrics(self, metrics: dict[str, Any]) -> None:
        text = f"Step {metrics['step']}/{metrics['total_steps']}: training loss={metrics['train_loss']:.4f}"
        if "valid_loss" in metrics:
            text += f", validation loss={metrics['valid_loss']:.4f}"
        self._event(text, type="metrics", data=metrics)
        self.curves.write(metrics)

    def restore_weights(self, model: Any, step: int) -> None:
        folder = checkpoints.step_folder(self.checkpoint_root, step)
        self.store.fetch_checkpoint(self.job_id, folder.name)
        checkpoints.load_weights(folder, model, self.method)

    def on_progress(self, step: int, total: int, epoch: float, eta: float | None) -> None:
        self._unwritten_progress = (step, total, epoch, eta)
        if step == total or self._progress_write.due():
            self._write_progress()

    def should_stop(self) -> Exception | None:
        stop = self._stop_reason()
        if stop is not None and not isinstance(stop, LeaseLost):
            self._write_progress()  # the job row shows the step it stopped at
        return stop

    def on_checkpoint(self, model: Any, optimizer: Any, scheduler: Any, position: Position, metrics: dict[str, Any],
                      epoch_end: bool) -> None:
        # Progress first: the job row never shows less than its newest checkpoint, where a resume starts.
        self._write_progress()
        early_stopping = {"best_valid_loss": position.best_valid_loss, "best_step": position.best_step,
                          "validations_since_best": position.validations_since_best}
        folder = checkpoints.save(self.checkpoint_root, model=model, method=self.method, optimizer=optimizer,
                                  scheduler=scheduler, step=position.step, epoch=position.epoch, batch=position.batch,
                                  trained_tokens=position.trained_tokens, metrics=metrics, fault=self.fault,
                                  early_stopping=early_stopping)
        self.store.publish_checkpoint(self.job_id, folder)
        self.curves.flush()
        self.last_checkpoint_step = position.step
        adapter = self._publish(folder, f"{self.final_name}:ckpt-step-{position.step}")
        with session_scope() as session:
            if not session.scalar(select(Checkpoint.id).where(Checkpoint.job_id == self.job_id,
                                                              Checkpoint.step_number == position.step)):
                jobs.add_checkpoint(session, self.job, adapter=adapter, step=position.step, metrics=metrics)
        self._event(f"Checkpoint saved at step {position.step}{' (end of epoch)' if epoch_end else ''}: "
                    f"{adapter.name}")

    def on_message(self, text: str) -> None:
        self._event(text, level="warn")

    # ------------------------------------------------------------------ how an attempt ends early

    def _cancelled(self) -> str:
        with session_scope() as session:
            if jobs.mark_cancelled(session, self.job_id, from_statuses={JobStatus.running}, owner=self.owner):
                jobs.add_event(session, self.job_id, "Fine-tuning job cancelled.")
        return "cancelled"

    def _paused(self) -> str:
        with session_scope() as session:
            if jobs.mark_paused(session, self.job_id, owner=self.owner):
                jobs.add_event(session, self.job_id, f"Job paused at step {self.last_checkpoint_step}; resume it "
                                                     "to continue from there.")
        return "paused"

    def _timed_out(self) -> str:
        with session_scope() as session:
            if jobs.mark_failed(session, self.job_id, code="timeout", owner=self.owner,
                                message=f"the job reached its time limit of {self.job.soft_time_limit:.0f} s; the "
                                        f"checkpoint at step {self.last_checkpoint_step} was kept"):
                jobs.add_event(session, self.job_id, "Time limit reached; the job failed after saving a checkpoint.",
                               level="error")
        return "timeout"

    def _handed_back(self) -> str:
        with session_scope() as session:
            if jobs.release(session, self.job_id, owner=self.owner):
                jobs.add_event(session, self.job_id, "Worker shutting down; the job goes back to the queue and "
                                                     f"will resume from step {self.last_checkpoint_step}.")
        enqueue_training(self.job_id)  # if the broker is down, the reaper re-sends it
        return "handed_back"

    # ------------------------------------------------------------------ helpers

    def _stop_reason(self) -> Exception | None:
        if self.lease.lost.is_set():  # in memory, so every step
            return LeaseLost()
        if self._stop_check.due():  # a query, so at most once per POLL_SECONDS
            with session_scope() as session:
                cancel, pause = jobs.stop_requests(session, self.job_id)
            if cancel:
                return Cancelled()
            if pause:
                return Paused()
        limit = self.job.soft_time_limit
        if limit is not None and time.time() - (self.job.started_at or time.time()) > limit:
            return TimeLimit()
        if process.shutting_down.is_set():
            return HandBack()
        return None

    def _write_progress(self) -> None:
        if self._unwritten_progress is None:
            return
        step, total, epoch, eta = self._unwritten_progress
        with session_scope() as session:
            jobs.record_progress(session, self.job_id, step=step, total_steps=total, epoch=epoch, eta_seconds=eta)
        self._unwritten_progress = None

    def _batching_event(self, base: Any) -> None:
        """How this job's examples become batches, and the attention that runs them (a family without SDPA, such
        as Gemma 2 whose soft-capping SDPA cannot do, trains with its own eager attention, which costs more)."""
        attention = available(base, "sdpa")
        packed = self.method.packs_examples
        rows = ("packed rows (several examples a row, each attending only to itself)" if packed else
                "one example a row, padded (the method puts its virtual tokens in front of each example)")
        why = "" if attention == "sdpa" else f" (the {base.config.model_type} family has no SDPA attention)"
        self._event(f"Batches: {rows}; attention: {attention}{why}.",
                    data={"packed": packed, "attention": attention})

    def _event(self, text: str, **kwargs: Any) -> None:
        with session_scope() as session:
            jobs.add_event(session, self.job_id, text, **kwargs)

    def _phase_done(self, phase: str, text: str, **data: Any) -> None:
        # Start-up phases are events with their durations: a job whose time limit ran out before its first
        # step shows where the time went (the limit's clock starts when a worker claims the job).
        seconds = round(time.perf_counter() - self._phase_started, 2)
        self._event(f"{text} in {seconds:.2f} s.", data={"phase": phase, "seconds": seconds, **data})
        self._phase_started = time.perf_counter()

    def _publish(self, source: Any, name: str) -> Adapter:
        """A servable adapter from a model (or a checkpoint folder), unless the job's tenant has one of that name
        (a second attempt publishing again). Only its own tenant's: names are per tenant, and taking another
        tenant's adapter of the same name would give this job's result that tenant's weights."""
        with session_scope() as session:
            existing = session.scalar(select(Adapter).where(Adapter.tenant_id == self.job.tenant_id,
                                                            Adapter.name == name))
            if existing is not None:
                session.expunge(existing)
                return existing
        staging = self.store.staging_dir()
        if isinstance(source, Path):
            for item in ADAPTER_FILES:
                shutil.copyfile(source / item, staging / item)
        else:
            checkpoints.save_adapter(source, staging, self.method)
        adapter_id = new_id("adapter")
        self.store.publish_adapter(staging, adapter_id)
        row = Adapter(id=adapter_id, tenant_id=self.job.tenant_id, name=name, base_model=self.job.model,
                      method=self.method_type, job_id=self.job.id, size_bytes=self.store.adapter_size(adapter_id),
                      status=AdapterStatus.ready)
        with session_scope() as session:
            session.add(row)
        return row
