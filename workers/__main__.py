"""`python -m workers [--burst] [--queue NAME] [--name NAME] [--fork]`: one RQ queue worker.

Needs `REDIS_URL` (and the same `DATABASE_URL`/`DATA_ROOT` as the API). Heavy imports
(torch, transformers when installed, every attribution method) happen once, before the
first job. By default the worker is RQ's `SimpleWorker`: jobs run in this process, so the
per-process caches (loaded models, verified file hashes) serve every later job and a CUDA
context is created once (CUDA cannot be used in a forked child of a process that touched
it). Cancels and timeouts are handled by the job itself (its progress writer reads the
query's status). `--fork` selects RQ's forking `Worker`: each job runs in a fresh child
(memory returned after every job, RQ can kill a stuck job), at the price of reloading the
model per job; don't combine it with CUDA.

SIGTERM/SIGINT: RQ's warm shutdown (finish the current job, then exit); a second signal
stops at once, and the stale-job reaper of any worker re-enqueues the interrupted query
once its lease expires. The reaper runs at start-up and every `REAPER_INTERVAL_S` seconds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description="Run an attribution queue worker.")
    parser.add_argument("--burst", action="store_true", help="drain the queue, then exit")
    parser.add_argument("--queue", default=None, help="queue name (default: QUEUE_NAME setting)")
    parser.add_argument("--name", default=None, help="worker name (default: RQ's random name)")
    parser.add_argument("--fork", action="store_true", help="run each job in a forked child (RQ Worker)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    from service.settings import get_settings

    settings = get_settings()
    if not settings.redis_url:
        print("python -m workers: REDIS_URL is not set. Queue workers need Redis; without it the API "
              "runs jobs in-process and no worker is needed.", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Import every heavy dependency once, before any job (and before any fork). torch.optim
    # imports torch._dynamo on the first optimizer it builds (seconds): do it here, not in a job.
    import torch._dynamo  # noqa: F401  (imports torch too)

    from attribution.methods.registry import available_methods
    from workers import jobs  # noqa: F401
    from workers.reaper import reap_stale_queries, start_reaper

    logging.getLogger(__name__).info("methods available: %s", ", ".join(available_methods()))

    from redis import Redis
    from rq import Queue, SimpleWorker, Worker

    connection = Redis.from_url(settings.redis_url)
    try:
        reap_stale_queries(settings)
    except Exception:
        logging.getLogger(__name__).exception("start-up reaper pass failed")
    stop = threading.Event()
    start_reaper(settings, stop)
    worker_class = Worker if args.fork else SimpleWorker
    worker = worker_class([Queue(args.queue or settings.queue_name, connection=connection)],
                          connection=connection, name=args.name)
    try:
        worker.work(burst=args.burst, logging_level=args.log_level.upper())
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
