"""The bundled example: find a test point leaked into the training set of a digits MLP.

`python examples/digits_demo.py build DATA_ROOT` trains a small MLP on scikit-learn's
digits (offline, seconds) with five test points copied into its training set, and writes
`DATA_ROOT/example/`: `mlp.pt` (TorchScript), `train-000.npz`, `train-001.npz` (shards with
`x`, `y`, `ids`) and `queries.json` (the leaked test points and where their copies are).

`python examples/digits_demo.py query URL` registers the model and dataset with the
running service, POSTs one Forward-INF query per leaked point and prints the top rows,
marking the planted copy. Only the REST API is used, as a notebook or CI job would.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import torch
import torch.nn.functional as F
from demo_support import check, main, poll
from sklearn.datasets import load_digits
from torch import nn

NUM_LEAKED = 5


def build(data_root: Path) -> Path:
    out = data_root / "example"
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:1400], order[1400:]
    leaked = test[:NUM_LEAKED]
    train_rows = np.concatenate([train, leaked])
    rng.shuffle(train_rows)
    x_train, y_train = x[train_rows], y[train_rows]
    ids = np.array([f"digits-{i:04d}" for i in train_rows])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    accuracy = float((model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean())
    torch.jit.save(torch.jit.script(model), out / "mlp.pt")

    half = len(train_rows) // 2
    np.savez(out / "train-000.npz", x=x_train[:half], y=y_train[:half], ids=ids[:half])
    np.savez(out / "train-001.npz", x=x_train[half:], y=y_train[half:], ids=ids[half:])
    copies = [int(np.where(train_rows == t)[0][0]) for t in leaked]
    queries = {"x": x[leaked].tolist(), "y": y[leaked].tolist(), "copy_index": copies,
               "test_accuracy": accuracy}
    (out / "queries.json").write_text(json.dumps(queries))
    print(f"built {out}: {len(train_rows)} training rows in 2 shards, MLP test accuracy {accuracy:.3f}")
    return out


def query(url: str, data_root: Path) -> None:
    example = data_root / "example"
    queries = json.loads((example / "queries.json").read_text())
    uri = lambda name: (example / name).resolve().as_uri()  # noqa: E731
    with httpx.Client(base_url=url, timeout=60) as client:
        model = check(client.post("/v1/models", json={
            "name": "digits-mlp", "uri": uri("mlp.pt"), "format": "torchscript", "task": "classification"}))
        dataset = check(client.post("/v1/datasets", json={
            "name": "digits-train", "shards": [{"uri": uri("train-000.npz")}, {"uri": uri("train-001.npz")}]}))
        print(f"registered model {model['id']} ({model['num_parameters']} parameters) "
              f"and dataset {dataset['id']} ({dataset['num_samples']} rows)")
        found = 0
        for i, (x, y, copy) in enumerate(zip(queries["x"], queries["y"], queries["copy_index"], strict=True)):
            body = {"model_id": model["id"], "dataset_id": dataset["id"], "method": "forward_inf",
                    "samples": {"x": [x], "y": [y]}, "top_k": 5, "params": {"normalize": "relative"}}
            posted = check(client.post("/v1/queries", json=body))
            result = poll(client, posted["id"])
            top = result["result"]["top"]
            rank = next((row["rank"] for row in top if row["index"] == copy), None)
            found += rank == 1
            print(f"\nquery {i} (label {y}) -> {result['status']} in "
                  f"{sum(result['result'].get('timings', {}).values()):.2f}s; planted copy is row {copy}")
            for row in top:
                mark = "  <- the leaked copy" if row["index"] == copy else ""
                print(f"  #{row['rank']} row {row['index']:5d} ({row['sample_id']}, shard {row['shard']}) "
                      f"score {row['score']:+.4f}{mark}")
        print(f"\nleaked copies ranked first: {found}/{len(queries['x'])}")


if __name__ == "__main__":
    main(__doc__, build, query)
