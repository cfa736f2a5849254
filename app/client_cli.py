"""The `adaptery` client verbs (files, jobs, models, adapters, evals, chat): thin calls to the REST API.

The API's URL and key come from `--api-url` / `--api-key` or ADAPTERY_API_URL / ADAPTERY_API_KEY. Every
failure is one readable line on stderr and a non-zero exit, never a traceback: the API's own error message
(with the field it names), or why the API could not be reached.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import typer
from httpx_sse import SSEError, connect_sse
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

DEFAULT_API_URL = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "failed", "cancelled"}

out = Console()
err = Console(stderr=True)


class Api:
    """One HTTP client on the API, with the key; raises ClientError with the API's message on an error."""

    def __init__(self, url: str, key: str | None, as_json: bool):
        self.url, self.as_json = url.rstrip("/"), as_json
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(60, connect=5))

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        check(response)
        return response.json() if response.headers.get("content-type", "").startswith("application/json") \
            else response.content


class ClientError(Exception):
    pass


def check(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        text = error["message"] + (f" (field: {error['param']})" if error.get("param") else "")
    except (ValueError, KeyError, TypeError):
        text = response.text[:300] or response.reason_phrase
    raise ClientError(f"{response.status_code}: {text}")


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@dataclass
class Options:
    url: str
    key: str | None
    as_json: bool
    client: Api | None = None


def api(ctx: typer.Context) -> Api:
    """The command's API client, made on first use (server commands never need one)."""
    options: Options = ctx.find_root().obj
    if options.client is None:
        options.client = Api(options.url, options.key, options.as_json)
    return options.client


def show(ctx: typer.Context, value: Any, columns: list[str] | None = None) -> None:
    """JSON with --json; otherwise a table of `columns` for lists, or the object as indented JSON."""
    if api(ctx).as_json or columns is None:
        out.print_json(json.dumps(value))
        return
    rows = value.get("data", []) if isinstance(value, dict) else value
    table = Table(*columns, header_style="bold")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    out.print(table)


# ---------------------------------------------------------------- files

files = typer.Typer(help="Upload, list and delete datasets.", no_args_is_help=True)


@files.command("upload")
def files_upload(ctx: typer.Context, path: Path = typer.Argument(..., exists=True, dir_okay=False),
                 purpose: str = typer.Option("fine-tune")) -> None:
    """Upload a JSONL dataset; shows its validation result."""
    with path.open("rb") as handle:
        row = api(ctx).call("POST", "/v1/files", files={"file": (path.name, handle)}, data={"purpose": purpose})
    show(ctx, row)


@files.command("list")
def files_list(ctx: typer.Context) -> None:
    show(ctx, api(ctx).call("GET", "/v1/files", params={"limit": 100}),
         ["id", "filename", "status", "n_examples", "n_tokens", "bytes"])


@files.command("delete")
def files_delete(ctx: typer.Context, file_id: str) -> None:
    show(ctx, api(ctx).call("DELETE", f"/v1/files/{file_id}"))


# ---------------------------------------------------------------- jobs

jobs = typer.Typer(help="Create, follow and steer fine-tuning jobs.", no_args_is_help=True)


def parse_hyperparameters(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values read as JSON where they parse (numbers, true, lists), else as text."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            fail(f"--hp takes key=value, got {pair!r}")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    return values


@jobs.command("create")
def jobs_create(ctx: typer.Context, training_file: str = typer.Option(..., "--training-file", "-t"),
                model: str = typer.Option(None, help="base model (default: the server's default)"),
                method: str = typer.Option(None, help="the method's type (default: the server's default method)"),
                validation_file: str = typer.Option(None, "--validation-file", "-v"),
                hp: list[str] = typer.Option([], help="a hyperparameter as key=value (repeatable)"),
                suffix: str = typer.Option(None), seed: int = typer.Option(None),
                from_model: str = typer.Option(None, help="start from this fine-tuned model's weights"),
                watch: bool = typer.Option(False, help="follow the job until it ends (as `jobs watch`)")) -> None:
    hyperparameters = parse_hyperparameters(hp)
    body: dict[str, Any] = {"training_file": training_file}
    if method:
        body["method"] = {"type": method, method: {"hyperparameters": hyperparameters}}
    elif hyperparameters:
        body["hyperparameters"] = hyperparameters  # the default method's, as OpenAI's older shape sends them
    if model is None:
        listed = api(ctx).call("GET", "/v1/models")["data"]
        bases = [m["id"] for m in listed if m.get("owned_by") == "system"]
        if not bases:
            fail("no base model found; give --model")
        model = bases[0]
    body["model"] = model
    for key, value in (("validation_file", validation_file), ("suffix", suffix), ("seed", seed),
                       ("from_model", from_model)):
        if value is not None:
            body[key] = value
    job = api(ctx).call("POST", "/v1/fine_tuning/jobs", json=body)
    if watch:
        follow(ctx, job["id"])
    else:
        show(ctx, job)


@jobs.command("list")
def jobs_list(ctx: typer.Context) -> None:
    page = api(ctx).call("GET", "/v1/fine_tuning/jobs", params={"limit": 100})
    for job in page["data"]:
        job["step"] = f"{job['progress']['step']}/{job['progress']['total_steps']}" if job.get("progress") else ""
    show(ctx, page, ["id", "model", "status", "step", "fine_tuned_model"])


@jobs.command("get")
def jobs_get(ctx: typer.Context, job_id: str) -> None:
    show(ctx, api(ctx).call("GET", f"/v1/fine_tuning/jobs/{job_id}"))


def post_action(group: typer.Typer, route: str, action: str, summary: str) -> None:
    """A verb that POSTs to {route}/{ID}/{action} and shows the answer (cancel, pause, pin, ...)."""

    def command(ctx: typer.Context, object_id: str = typer.Argument(..., metavar="ID")) -> None:
        show(ctx, api(ctx).call("POST", f"{route}/{object_id}/{action}"))

    command.__doc__ = summary
    group.command(action)(command)


post_action(jobs, "/v1/fine_tuning/jobs", "cancel", "Cancel a job (a running one stops at its next step).")
post_action(jobs, "/v1/fine_tuning/jobs", "pause", "Pause a job: it checkpoints and releases its worker.")
post_action(jobs, "/v1/fine_tuning/jobs", "resume", "Resume a paused job from its checkpoint.")


@jobs.command("watch")
def jobs_watch(ctx: typer.Context, job_id: str) -> None:
    """A live progress bar (step, loss, ETA) from the job's event stream; exits 0 when the job succeeds,
    1 with its error when it fails, 2 when it is cancelled."""
    follow(ctx, job_id)


def job_events(client: Api, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event type, data) from the live stream, reconnecting with Last-Event-ID if the connection drops."""
    last_id: str | None = None
    failures = 0
    while True:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            with connect_sse(client.http, "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"},
                             headers=headers, timeout=httpx.Timeout(None, connect=5)) as source:
                check(source.response)
                for sse in source.iter_sse():
                    failures = 0
                    if not sse.data:  # a keep-alive (a comment, which the reader hands on with the last id)
                        continue
                    if sse.id:
                        last_id = sse.id
                    yield sse.event, json.loads(sse.data)
                    if sse.event == "end":
                        return
        except (httpx.TransportError, SSEError) as exc:
            failures += 1
            if failures > 5:
                raise ClientError(f"lost the event stream of {job_id}: {exc}") from exc
            time.sleep(min(2.0 * failures, 10))


def follow(ctx: typer.Context, job_id: str) -> None:
    client = api(ctx)
    job = client.call("GET", f"/v1/fine_tuning/jobs/{job_id}")
    total = (job.get("progress") or {}).get("total_steps") or None
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[steps]}"), TextColumn("{task.fields[loss]}"),
               TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=False) as progress:
        bar = progress.add_task(job_id, total=total, loss="", steps="")
        status = job["status"]
        for kind, data in job_events(client, job_id):
            if kind == "end":
                status = data["status"]
                break
            if client.as_json:
                out.print(json.dumps(data), highlight=False, soft_wrap=True)
            metrics = data.get("data") or {}
            if data.get("type") == "metrics" and "step" in metrics:
                loss = f"loss {metrics['train_loss']:.4f}" if "train_loss" in metrics else ""
                if "valid_loss" in metrics:
                    loss += f" · valid {metrics['valid_loss']:.4f}"
                total = metrics.get("total_steps") or total
                progress.update(bar, completed=metrics["step"], total=total, loss=loss,
                                steps=f"step {metrics['step']}/{total}")
            elif not client.as_json:
                progress.console.print(f"[dim]{data.get('message', '')}[/]", highlight=False)
    job = client.call("GET", f"/v1/fine_tuning/jobs/{job_id}")
    if status == "succeeded":
        out.print(f"[green]succeeded[/]: {job.get('fine_tuned_model')}")
        return
    if status == "cancelled":
        fail(f"job {job_id} was cancelled", code=2)
    error = job.get("error") or {}
    fail(f"job {job_id} failed: {error.get('message') or 'no reason given'}")


# ---------------------------------------------------------------- models, adapters, evaluations

models = typer.Typer(help="The models you can query: base models and fine-tuned ones.", no_args_is_help=True)


@models.command("list")
def models_list(ctx: typer.Context) -> None:
    show(ctx, api(ctx).call("GET", "/v1/models"), ["id", "owned_by", "created"])


@models.command("delete")
def models_delete(ctx: typer.Context, model: str,
                  keep_checkpoints: bool = typer.Option(False, help="keep a job's checkpoints with its final model")
                  ) -> None:
    """Delete one of your fine-tuned models or imports (requests running on it finish)."""
    show(ctx, api(ctx).call("DELETE", f"/v1/models/{model}", params={"keep_checkpoints": keep_checkpoints}))


aliases = typer.Typer(help="Aliases: stable model names your applications call, promoted and rolled back.",
                      no_args_is_help=True)


@aliases.command("list")
def aliases_list(ctx: typer.Context) -> None:
    show(ctx, api(ctx).call("GET", "/v1/aliases"), ["id", "model", "updated_at"])


@aliases.command("set")
def aliases_set(ctx: typer.Context, alias: str, model: str) -> None:
    """Point ALIAS (created if new) at MODEL, one of your fine-tuned models, checkpoints or imports."""
    show(ctx, api(ctx).call("PUT", f"/v1/aliases/{alias}", json={"model": model}))


@aliases.command("rollback")
def aliases_rollback(ctx: typer.Context, alias: str) -> None:
    """Point ALIAS back at what it pointed to before its latest change."""
    show(ctx, api(ctx).call("POST", f"/v1/aliases/{alias}/rollback"))


@aliases.command("history")
def aliases_history(ctx: typer.Context, alias: str) -> None:
    """Every change of ALIAS, oldest first."""
    found = api(ctx).call("GET", f"/v1/aliases/{alias}")
    show(ctx, found if api(ctx).as_json else {"data": found["history"]},
         ["created_at", "action", "model", "adapter_id"])


@aliases.command("delete")
def aliases_delete(ctx: typer.Context, alias: str) -> None:
    """Remove ALIAS (the model it points to stays)."""
    show(ctx, api(ctx).call("DELETE", f"/v1/aliases/{alias}"))


adapters = typer.Typer(help="Adapters: residency, pinning, import and download.", no_args_is_help=True)


@adapters.command("list")
def adapters_list(ctx: typer.Context) -> None:
    show(ctx, api(ctx).call("GET", "/v1/adapters"), ["id", "name", "base_model", "method", "state", "pinned"])


post_action(adapters, "/v1/adapters", "pin", "Keep an adapter in memory and in its slot.")
post_action(adapters, "/v1/adapters", "unpin", "Let an adapter be evicted again.")


@adapters.command("import")
def adapters_import(ctx: typer.Context, path: Path = typer.Argument(..., exists=True,
                                                                    help="a zip, or a folder with the two files"),
                    name: str = typer.Option(None), base_model: str = typer.Option(None)) -> None:
    form = {k: v for k, v in (("name", name), ("base_model", base_model)) if v}
    if path.is_dir():
        parts = [("files", (n, (path / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
        show(ctx, api(ctx).call("POST", "/v1/adapters", files=parts, data=form))
    else:
        show(ctx, api(ctx).call("POST", "/v1/adapters", files={"file": (path.name, path.read_bytes())}, data=form))


@adapters.command("download")
def adapters_download(ctx: typer.Context, adapter: str, output: Path = typer.Option(None, "--output", "-o")) -> None:
    """Save the adapter (adapter_config.json and adapter_model.safetensors) as a zip."""
    content = api(ctx).call("GET", f"/v1/adapters/{adapter}/content")
    target = output or Path(f"{adapter.replace(':', '_').replace('/', '_')}.zip")
    target.write_bytes(content)
    out.print(f"saved {target} ({len(content)} bytes)")


evals = typer.Typer(help="Compare models on a file.", no_args_is_help=True)


@evals.command("create")
def evals_create(ctx: typer.Context, file: str = typer.Option(..., "--file", "-f"),
                 model: list[str] = typer.Option(..., "--model", "-m", help="repeat for each model to compare"),
                 wait: bool = typer.Option(True, help="wait for the results")) -> None:
    evaluation = api(ctx).call("POST", "/v1/evaluations", json={"file": file, "models": model})
    while wait and evaluation["status"] not in TERMINAL:
        time.sleep(1)
        evaluation = api(ctx).call("GET", f"/v1/evaluations/{evaluation['id']}")
    if evaluation["status"] == "failed":
        fail(f"evaluation {evaluation['id']} failed: {(evaluation.get('error') or {}).get('message')}")
    show(ctx, evaluation)


@evals.command("get")
def evals_get(ctx: typer.Context, evaluation_id: str) -> None:
    show(ctx, api(ctx).call("GET", f"/v1/evaluations/{evaluation_id}"))


@evals.command("list")
def evals_list(ctx: typer.Context) -> None:
    show(ctx, api(ctx).call("GET", "/v1/evaluations"), ["id", "status", "file", "created_at"])


def chat(ctx: typer.Context, model: str = typer.Option(..., "--model", "-m"),
         message: str = typer.Option(None, help="send this one message and exit (otherwise: interactive)"),
         max_tokens: int = typer.Option(256), temperature: float = typer.Option(0.0)) -> None:
    """Chat with a model, the answer streamed as it is generated; an empty line or Ctrl-D ends."""
    history: list[dict[str, str]] = []
    while True:
        text = message if message is not None else _prompt()
        if not text:
            return
        history.append({"role": "user", "content": text})
        answer = _stream_answer(api(ctx), model, history, max_tokens, temperature)
        history.append({"role": "assistant", "content": answer})
        if message is not None:
            return


def _prompt() -> str:
    try:
        return input("you> " if sys.stdin.isatty() else "").strip()
    except EOFError:
        return ""


def _stream_answer(client: Api, model: str, history: list[dict[str, str]], max_tokens: int,
                   temperature: float) -> str:
    body = {"model": model, "messages": history, "stream": True, "max_tokens": max_tokens,
            "temperature": temperature}
    pieces: list[str] = []
    with connect_sse(client.http, "POST", "/v1/chat/completions", json=body) as source:
        if not source.response.is_success:
            source.response.read()
            check(source.response)
        for sse in source.iter_sse():
            if not sse.data:  # a keep-alive
                continue
            if sse.data == "[DONE]":
                break
            chunk = json.loads(sse.data)
            if "error" in chunk:
                raise ClientError(chunk["error"].get("message", "generation failed"))
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content") or ""
                pieces.append(piece)
                out.print(piece, end="", highlight=False, soft_wrap=True)
    out.print()
    return "".join(pieces)


def register(cli: typer.Typer) -> None:
    """Add the client verbs and their --api-url / --api-key / --json options to the `adaptery` command."""

    @cli.callback()
    def options(ctx: typer.Context,
                api_url: str = typer.Option(DEFAULT_API_URL, envvar="ADAPTERY_API_URL", help="the API's base URL"),
                api_key: str = typer.Option(None, envvar="ADAPTERY_API_KEY", help="your API key"),
                as_json: bool = typer.Option(False, "--json", help="print the API's JSON instead of tables")) -> None:
        ctx.obj = Options(api_url, api_key, as_json)

    cli.add_typer(files, name="files")
    cli.add_typer(jobs, name="jobs")
    cli.add_typer(models, name="models")
    cli.add_typer(aliases, name="aliases")
    cli.add_typer(adapters, name="adapters")
    cli.add_typer(evals, name="eval")
    cli.command("chat")(chat)


def run(cli: typer.Typer) -> None:
    """Run the command; an API error or an unreachable API is one line on stderr and exit status 1."""
    try:
        cli()
    except ClientError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except httpx.HTTPError as exc:
        err.print(f"[red]error:[/] cannot reach the API ({type(exc).__name__}: {exc}); check --api-url / "
                  "ADAPTERY_API_URL", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:  # a bug of ours: still one line (ADAPTERY_DEBUG=1 shows the traceback)
        if os.environ.get("ADAPTERY_DEBUG"):
            raise
        err.print(f"[red]error:[/] {type(exc).__name__}: {exc} (ADAPTERY_DEBUG=1 shows where)", highlight=False,
                  soft_wrap=True)
        sys.exit(1)
