"""rlmesh.data: the Batch container, prompt datasets and data preparation."""

from rlmesh.data.batch import Batch, BatchParts, balanced_partition, response_tokens
from rlmesh.data.dataset import PromptDataset, PromptLoader, PromptRow

__all__ = ["Batch", "BatchParts", "PromptDataset", "PromptLoader", "PromptRow", "balanced_partition", "response_tokens"]
from rlmesh.data.synthetic import make_task_rows as make_task_rows
