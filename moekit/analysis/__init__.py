"""Routing analysis: expert load, imbalance, dead experts, co-selection and specialisation.

`stats` holds pure functions over routing results, `counts` sums a layer's routing over a
dataset, `collect` runs a model over labelled documents, `plots` draws the figures, and
`analyze_checkpoint(path, out_dir)` does all of it for a saved model.
"""

from moekit.analysis.collect import collect_routing, labelled_batches
from moekit.analysis.counts import LayerCounts, LayerSummary
from moekit.analysis.report import analyze_checkpoint, analyze_model, format_summary, format_table
from moekit.analysis.stats import (
    co_selection,
    co_selection_conditional,
    coefficient_of_variation,
    dead_experts,
    domain_expert_counts,
    expert_counts,
    js_divergence,
    load_entropy,
    load_imbalance,
    mutual_information,
    specialisation_score,
)

__all__ = [
    "LayerCounts",
    "LayerSummary",
    "analyze_checkpoint",
    "analyze_model",
    "co_selection",
    "co_selection_conditional",
    "coefficient_of_variation",
    "collect_routing",
    "dead_experts",
    "domain_expert_counts",
    "expert_counts",
    "format_summary",
    "format_table",
    "js_divergence",
    "labelled_batches",
    "load_entropy",
    "load_imbalance",
    "mutual_information",
    "specialisation_score",
]
