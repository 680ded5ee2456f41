"""Evaluation: per-gene metrics, per-sample gene sets, benchmark tables.

See ``docs/evaluation.md`` for the conventions (PCC per gene across the spots of
one held-out sample, constant genes counted as 0, averaging genes -> samples ->
seeds).
"""

from cmrcnet.evaluation.gene_sets import (
    evaluation_sets,
    marker_genes,
    top_expressed,
    top_variable,
)
from cmrcnet.evaluation.metrics import (
    evaluate_prediction,
    gene_gene_correlation_similarity,
    per_gene_metrics,
)
from cmrcnet.evaluation.summary import (
    Collection,
    ablation_table,
    collect,
    scan,
    table1,
    table2,
    to_html,
    to_markdown,
    top_genes,
)

__all__ = [
    "Collection",
    "ablation_table",
    "collect",
    "evaluate_prediction",
    "evaluation_sets",
    "gene_gene_correlation_similarity",
    "marker_genes",
    "per_gene_metrics",
    "scan",
    "table1",
    "table2",
    "to_html",
    "to_markdown",
    "top_expressed",
    "top_genes",
    "top_variable",
]
