"""`attribution`: the service from a shell or a CI job (`pip install attribution-service`).

Every command takes `--json` (one JSON document on stdout, for scripts); the service's address
and key come from `--url`/`--api-key` or `ATTRIBUTION_URL`/`ATTRIBUTION_API_KEY`. Exit codes
(`cli_support.ExitCode`): 0 ok, 1 a `--fail-if-...` gate tripped, 2 bad command line, 3 query
failed or canceled, 4 the service refused the request, 5 service unreachable, 6 `--wait` timed out.

    attribution models add digits-mlp file:///data/example/mlp.pt --task classification
    attribution datasets add digits file:///data/example/train-000.npz file:///data/example/train-001.npz
    attribution query --model M --dataset D --samples queries.json --sample-index 0 \\
        --param normalize=relative --wait --fail-if-top-score-above 0.9
    attribution export QUERY_ID --format parquet --output scores.parquet
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from attribution_client.cli_support import (
    ExitCode,
    UsageError,
    gate,
    parse_params,
    ranked_table,
    read_samples,
    stability_figures,
    table,
    write_scores,
)
from attribution_client.client import Client
from attribution_client.errors import ApiError, QueryFailed, ServiceUnreachable, WaitTimeout
from attribution_client.models import ApiModel, Query

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
models_app = typer.Typer(help="Register and list models.", no_args_is_help=True)
datasets_app = typer.Typer(help="Register and list training datasets.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(datasets_app, name="datasets")

JsonOut = Annotated[bool, typer.Option("--json", help="print one JSON document (for scripts)")]
Limit = Annotated[int, typer.Option(min=1, max=500, help="items per page")]


@app.callback()
def connection(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(envvar="ATTRIBUTION_URL", help="service URL")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="ATTRIBUTION_API_KEY", help="API key (Bearer)")] = None,
) -> None:
    ctx.obj = {"url": url, "api_key": api_key}


def _client(ctx: typer.Context) -> Client:
    obj = ctx.find_root().obj or {}
    return Client(obj.get("url"), obj.get("api_key"))


def _emit(as_json: bool, value: Any, text: str) -> None:
    if as_json:
        data = value.model_dump(mode="json") if isinstance(value, ApiModel) else value
        typer.echo(json.dumps(data, default=str))
    else:
        typer.echo(text)


# ------------------------------------------------------------------ models
@models_app.command("add")
def models_add(ctx: typer.Context, name: str, uri: str,
               task: Annotated[str, typer.Option(help="classification | regression | causal_lm")],
               format: Annotated[str, typer.Option(help="torchscript | hf | safetensors | auto")] = "auto",
               architecture: Annotated[str | None, typer.Option(help="safetensors entry point")] = None,
               as_json: JsonOut = False) -> None:
    """Register a model file (a file:// URI the server can read, inside its DATA_ROOT)."""
    with _client(ctx) as client:
        model = client.register_model(name, uri, task=task, format=format, architecture=architecture)
    _emit(as_json, model, f"{model.id}  {model.name}  {model.format}/{model.task}  "
                          f"{model.num_parameters} parameters  sha256 {model.sha256[:12]}")


@models_app.command("list")
def models_list(ctx: typer.Context, limit: Limit = 50, as_json: JsonOut = False) -> None:
    """The tenant's models, newest first."""
    with _client(ctx) as client:
        models = client.list_models(limit=limit)
    rows = [[m.id, m.name, m.format, m.task, m.num_parameters, f"{m.created_at:%Y-%m-%d %H:%M}"] for m in models]
    _emit(as_json, [m.model_dump(mode="json") for m in models],
          table(rows, ["id", "name", "format", "task", "parameters", "created"]))


# ------------------------------------------------------------------ datasets
@datasets_app.command("add")
def datasets_add(ctx: typer.Context, name: str,
                 shards: Annotated[list[str], typer.Argument(help="shard URIs, in global row order")],
                 as_json: JsonOut = False) -> None:
    """Register a training set from its shards (.npz, .parquet, .pt, .jsonl)."""
    with _client(ctx) as client:
        dataset = client.register_dataset(name, shards)
    _emit(as_json, dataset, f"{dataset.id}  {dataset.name}  {dataset.num_samples} rows in "
                            f"{len(dataset.shards)} shards  sha256 {dataset.sha256[:12]}")


@datasets_app.command("list")
def datasets_list(ctx: typer.Context, limit: Limit = 50, as_json: JsonOut = False) -> None:
    """The tenant's datasets, newest first."""
    with _client(ctx) as client:
        datasets = client.list_datasets(limit=limit)
    rows = [[d.id, d.name, d.num_samples, len(d.shards), f"{d.created_at:%Y-%m-%d %H:%M}"] for d in datasets]
    _emit(as_json, [d.model_dump(mode="json") for d in datasets],
          table(rows, ["id", "name", "rows", "shards", "created"]))


# ------------------------------------------------------------------ queries
def _describe(query: Query) -> str:
    lines = [f"query {query.id}  {query.method}  {query.status}  progress {query.progress:.0%}"
             + ("  (cached)" if query.cached else "")]
    if query.error:
        lines.append(f"error: {query.error}")
    if query.result is not None:
        lines += ["top:", ranked_table(query.result.top)]
        if query.result.timings:
            lines.append("timings (s): " + ", ".join(
                f"{k.removesuffix('_s')} {v:.3g}" if isinstance(v, int | float) else f"{k} {v}"
                for k, v in query.result.timings.items()))
    return "\n".join(lines)


@app.command()
def query(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="model id")],
    dataset: Annotated[str, typer.Option(help="dataset id")],
    method: Annotated[str, typer.Option(help="forward_inf | influence | tracin | trak | ...")] = "forward_inf",
    samples: Annotated[Path | None, typer.Option(help="JSON file with x/y, text or refs lists")] = None,
    sample_index: Annotated[list[int] | None, typer.Option(help="keep these rows of --samples (repeat)")] = None,
    text: Annotated[list[str] | None, typer.Option(help="a text sample (repeat; language models)")] = None,
    top_k: Annotated[int, typer.Option(min=1)] = 10,
    param: Annotated[list[str] | None, typer.Option(help="method parameter key=value (repeat)")] = None,
    params: Annotated[str | None, typer.Option(help="method parameters as a JSON object")] = None,
    mode: Annotated[str, typer.Option(help="joint | per_sample")] = "joint",
    self_influence: Annotated[bool, typer.Option(help="score every row against itself (no samples)")] = False,
    stability: Annotated[int | None, typer.Option(
        help="rank stability of the ranked rows over this many resamples (2-32)")] = None,
    wait: Annotated[bool, typer.Option(help="wait until the query is final")] = False,
    progress: Annotated[bool, typer.Option(help="progress bar on stderr while waiting")] = True,
    timeout: Annotated[float | None, typer.Option(help="seconds to wait at most (exit 6 past it)")] = None,
    fail_if_top_score_above: Annotated[float | None, typer.Option(
        help="leakage gate: exit 1 when any sample's top-1 row scores above this (implies --wait)")] = None,
    as_json: JsonOut = False,
) -> None:
    """Submit an attribution query; with --wait, print its ranking (and apply the gate)."""
    if samples is not None and text:
        raise UsageError("give --samples or --text, not both")
    body = read_samples(samples, sample_index or []) if samples is not None else ({"text": text} if text else None)
    with _client(ctx) as client:
        extra: dict[str, Any] = {"stability": {"resamples": stability}} if stability is not None else {}
        handle = client.query(model, dataset, body, method=method, top_k=top_k, mode=mode,
                              params=parse_params(param or [], params), self_influence=self_influence, **extra)
        if wait or fail_if_top_score_above is not None:
            try:
                handle.wait(progress=progress and not as_json, timeout=timeout)
            except QueryFailed:
                _emit(as_json, handle.query, _describe(handle.query))
                raise
    checked = None if fail_if_top_score_above is None else gate(handle.query, fail_if_top_score_above)
    document = handle.query.model_dump(mode="json") | ({"gate": checked} if checked else {})
    text_out = _describe(handle.query)
    if checked:
        text_out += "\n" + ("gate passed" if checked["passed"] else "gate FAILED: " + "; ".join(
            f"sample {v['sample']}: row {v['index']} scores {v['score']:+.6g} > {checked['threshold']}"
            for v in checked["violations"]))
    _emit(as_json, document, text_out)
    if checked and not checked["passed"]:
        raise typer.Exit(ExitCode.GATE_FAILED)


@app.command()
def show(ctx: typer.Context, query_id: str, as_json: JsonOut = False) -> None:
    """A query's status, parameters and ranking."""
    with _client(ctx) as client:
        found = client.get_query(query_id)
    _emit(as_json, found, _describe(found))


@app.command()
def export(ctx: typer.Context, query_id: str,
           format: Annotated[str, typer.Option(help="csv | npy | parquet")] = "csv",
           output: Annotated[Path | None, typer.Option(help="file to write (default <id>.<format>)")] = None,
           as_json: JsonOut = False) -> None:
    """Write every training row's score (global row order) to a file."""
    if format not in ("csv", "npy", "parquet"):
        raise UsageError(f"--format {format!r}: one of csv, npy, parquet")
    path = output or Path(f"{query_id}.{format}")
    with _client(ctx) as client:
        scores = client.scores(query_id)
        figures = stability_figures(client.get_query(query_id)) if format != "npy" else {}
    write_scores(scores, path, format, figures)
    _emit(as_json, {"query_id": query_id, "path": str(path), "format": format, "shape": list(scores.shape)},
          f"wrote {path} ({format}, shape {list(scores.shape)})")


_ERRORS: dict[type[Exception], ExitCode] = {
    UsageError: ExitCode.USAGE, QueryFailed: ExitCode.QUERY_FAILED, ApiError: ExitCode.API_ERROR,
    ServiceUnreachable: ExitCode.UNREACHABLE, WaitTimeout: ExitCode.TIMEOUT,
}


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run a command; map the client's errors to their exit codes."""
    try:
        app(args=argv)
    except tuple(_ERRORS) as exc:
        code = next(c for kind, c in _ERRORS.items() if isinstance(exc, kind))
        if isinstance(exc, ApiError) and exc.status_code >= 500:
            code = ExitCode.UNREACHABLE
        typer.echo(f"attribution: {exc}", err=True)
        sys.exit(int(code))



if __name__ == "__main__":
    main()
