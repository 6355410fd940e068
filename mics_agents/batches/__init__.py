"""Provider batch APIs (OpenAI's Batch API, Anthropic's Message Batches) for the calls of a run that can
wait: ``mics run --batch``. See ``queue.py`` for how calls are queued, submitted and answered, and
``ledger.py`` for what is recorded before money is spent."""

from .ledger import BatchLedger, ledger_path
from .model import BatchedModel
from .queue import BatchQueue, BatchStats
from .setup import BatchWorker, batch_routes, open_batch_worker
from .wire import BatchRoute

__all__ = ["BatchQueue", "BatchStats", "BatchedModel", "BatchLedger", "BatchRoute", "BatchWorker", "batch_routes",
           "ledger_path", "open_batch_worker"]
