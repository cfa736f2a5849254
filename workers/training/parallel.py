"""Data-parallel training of one job over several processes of one host: one per GPU, or CPU processes.

Rank 0 is the job's runner (it owns the job row, events, validation and checkpoints); it starts the other
ranks as replica processes (`python -m workers.training.parallel SPEC RANK`: plain subprocesses, because a
Celery pool process is daemonic and may not have multiprocessing children). All ranks build the same model
from the same seed, rank 0's trainable weights are broadcast once, and every step each rank trains its
share of the step's examples with the loss divided by the whole step's labelled tokens; one all-reduce
sums the gradients, so every rank takes the same optimiser step as a single process would (the tests
check it to 1e-5). accelerate keeps doing device placement, autocast and backward in each process; the
process group is torch.distributed's own (gloo on CPU, NCCL on CUDA), created and destroyed per job,
since the worker process outlives many jobs and accelerate keeps one distributed state per process.
"""

from __future__ import annotations

import datetime
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters.data import EncodedExample

# How long a rank waits for the others: start-up (import, model load) and any one collective, which includes
# rank 0's validation and checkpoint writes between steps (the replicas wait for those).
TIMEOUT_SECONDS = 1800


class ReplicaStopped(Exception):
    """Rank 0 stopped the job (cancel, pause, shutdown, lease lost): a replica ends without a word."""


@dataclass
class DataParallel:
    """This process's place in the job's process group."""

    rank: int
    world: int
    # Set when the ranks agreed to stop early (cancel, pause, ...): every rank then leaves the group in step.
    stopped_together: bool = False

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, chunk: list[EncodedExample], max_len: int) -> list[EncodedExample]:
        """This rank's examples of a step: longest first to the least loaded rank (ties to the lower rank),
        kept in the step's order. Every rank computes the same assignment; rank 0 never gets none."""
        load = [0] * self.world
        owner: dict[int, int] = {}
        for index in sorted(range(len(chunk)), key=lambda i: -min(len(chunk[i].input_ids), max_len)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owner[index] = rank
            load[rank] += min(len(chunk[index].input_ids), max_len)
        return [example for i, example in enumerate(chunk) if owner[i] == self.rank]

    def sum_gradients(self, params: list[torch.Tensor], extras: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum every parameter's gradient (missing ones count as zero) and `extras` (step statistics) over the
        ranks, in one flat all-reduce; returns the summed extras."""
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                         + [e.reshape(-1).float() for e in extras])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        return [flat[offset + i] for i in range(len(extras))]

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag, on every rank."""
        import torch.distributed as dist

        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def stop_together(self, stop: bool) -> bool:
        """Whether rank 0 stops the job this step (its `stop`), on every rank."""
        self.stopped_together = self.agree(stop)
        return self.stopped_together

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Rank 0's values of `params` on every rank (after it loaded `from_model` weights, say)."""
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def device_for(rank: int, device_type: str) -> str:
    """Rank r trains on cuda:r with CUDA, on the CPU otherwise."""
    return f"cuda:{rank}" if device_type == "cuda" else "cpu"


def join_group(rank: int, world: int, rendezvous: str, device_type: str) -> DataParallel:
    """Join the job's group through `rendezvous`, a file in the job's private folder: a TCP rendezvous store
    would listen on every interface of the host. The ranks' own connections stay on the loopback interface
    (unless the operator names another), since every rank is on this host."""
    import torch.distributed as dist

    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(variable, "lo")
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{rendezvous}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    return DataParallel(rank=rank, world=world)


def leave_group(*, in_step: bool) -> None:
    """`in_step`: every rank is leaving at the same point (training done, or a stop they agreed on), so they
    meet at a barrier first and none tears the connections down while another still uses them (gloo aborts
    the process then). After a failure the others may be stuck in a collective: leave without waiting."""
    import torch.distributed as dist

    if dist.is_initialized():
        if in_step:
            dist.barrier()
        dist.destroy_process_group()


@dataclass
class ReplicaSpec:
    """Everything a replica needs to train its share: rank 0's training config and data (no callbacks: a replica
    reports nothing)."""

    model_path: str
    device_type: str  # "cpu" or "cuda"
    config: Any  # a loop.TrainingConfig
    train_examples: list[EncodedExample]
    torch_threads: int
    resume: Any = None  # a checkpoints.ResumeState
    memory: Any = None  # a memory.MemoryPlan


class Replicas:
    """`with Replicas(spec, world) as parallel:` starts ranks 1..world-1, joins the group as rank 0, and on
    leaving waits for the replicas (killing any that outlive the job by more than a few seconds)."""

    def __init__(self, spec: ReplicaSpec, world: int):
        self.spec, self.world = spec, world
        self.processes: list[subprocess.Popen[bytes]] = []
        self.folder: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> DataParallel:
        self.folder = tempfile.TemporaryDirectory(prefix="adaptery-replicas-")
        spec_path = Path(self.folder.name) / "spec.pickle"
        spec_path.write_bytes(pickle.dumps(self.spec))
        rendezvous = str(Path(self.folder.name) / "rendezvous")
        env = {**os.environ, "ADAPTERY_REPLICA_PARENT": str(os.getpid())}
        for rank in range(1, self.world):
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "workers.training.parallel", str(spec_path), str(rank), str(self.world),
                 rendezvous], env=env))
        try:
            self.parallel = join_group(0, self.world, rendezvous, self.spec.device_type)
        except BaseException:
            self._stop(wait=0)
            raise
        return self.parallel

    def __exit__(self, *exc: Any) -> None:
        in_step = exc[0] is None or self.parallel.stopped_together
        if not in_step:
            self._stop(wait=0)  # they may wait in a collective for this rank: end them first
        leave_group(in_step=in_step)
        self._stop(wait=10)

    def _stop(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.folder is not None:
            self.folder.cleanup()

    @property
    def exit_codes(self) -> list[int | None]:
        return [p.returncode for p in self.processes]


def _exit_with_parent() -> None:
    """A replica whose rank 0 died (kill -9 of the worker) has no one to train for: leave at once."""
    parent = int(os.environ.get("ADAPTERY_REPLICA_PARENT", "0"))

    def watch() -> None:
        while True:
            if parent and os.getppid() != parent:
                os._exit(3)
            time.sleep(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def replica_main(spec_path: str, rank: int, world: int, rendezvous: str) -> None:
    from adapters.base_models import load_model
    from workers.training.loop import ReplicaRecipe

    _exit_with_parent()
    spec: ReplicaSpec = pickle.loads(Path(spec_path).read_bytes())
    torch.set_num_threads(spec.torch_threads)
    parallel = join_group(rank, world, rendezvous, spec.device_type)
    in_step = False
    try:
        base = load_model(spec.model_path, device=device_for(rank, spec.device_type), dtype=spec.config.compute_dtype)
        ReplicaRecipe(spec.config, base_model=base, train_examples=spec.train_examples, parallel=parallel,
                      resume=spec.resume, memory=spec.memory).run()
        in_step = True
    except ReplicaStopped:
        in_step = True
    finally:
        leave_group(in_step=in_step)


if __name__ == "__main__":
    # Through the package module, not this __main__ copy: the loop raises the package's ReplicaStopped.
    from workers.training.parallel import replica_main as main

    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    # The replica has left its group cleanly; end here, before interpreter teardown, where a C++ thread the
    # process group left behind sometimes aborts the process ("terminate called without an active exception",
    # exit -6 about one run in ten) although the job's work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
