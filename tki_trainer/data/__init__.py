"""Dataset loaders (TRL prompt/completion rows with a stable ``id``), length fitting and query embeddings."""

from .bigbench import load_bigbench
from .formats import as_conversational, messages_to_prompt_completion
from .local import load_local
from .p3 import group_references, load_p3
from .queries import add_query_embeddings
from .sampling import balanced_subset, fitted_subset
from .sni import SniFitReport, fit_sni_prompts, load_sni, sni_from_hub_rows, sni_splits
from .tokenization import tokenize_row
from .truncation import FitReport, fit_prompts


__all__ = [
    "FitReport",
    "SniFitReport",
    "add_query_embeddings",
    "as_conversational",
    "balanced_subset",
    "fit_prompts",
    "fit_sni_prompts",
    "fitted_subset",
    "group_references",
    "load_bigbench",
    "load_local",
    "load_p3",
    "load_sni",
    "messages_to_prompt_completion",
    "sni_from_hub_rows",
    "sni_splits",
    "tokenize_row",
]
