"""Python client of the training-data attribution service (sync and async), and its `attribution` CLI.

```python
from attribution_client import Client
client = Client()            # ATTRIBUTION_URL (default http://127.0.0.1:8000), ATTRIBUTION_API_KEY
handle = client.query(model_id, dataset_id, x=x, y=y, params={"normalize": "relative"})
handle.wait(progress=True).to_pandas()
```
"""

from attribution_client.client import AsyncClient, Client
from attribution_client.errors import (
    ApiError,
    AttributionError,
    QueryFailed,
    ServiceUnreachable,
    WaitTimeout,
)
from attribution_client.handle import AsyncQueryHandle, QueryHandle
from attribution_client.models import (
    Dataset,
    Estimate,
    EstimatePhase,
    Model,
    Provenance,
    Query,
    QueryResult,
    RankedRow,
    SampleResult,
    Shard,
)

__all__ = [
    "ApiError", "AsyncClient", "AsyncQueryHandle", "AttributionError", "Client", "Dataset", "Estimate",
    "EstimatePhase", "Model", "Provenance", "Query",
    "QueryFailed", "QueryHandle", "QueryResult", "RankedRow", "SampleResult", "ServiceUnreachable", "Shard",
    "WaitTimeout",
]
