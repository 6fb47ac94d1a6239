"""Evaluation toolkit for attribution methods on a proxy model.

Leave-one-out ground truth (`loo`), the Linear Datamodeling Score (`lds`), the mirrored
influence correlation (`mirrored`), duplicate/leakage detection (`leakage`) and mislabel
detection from self-influence (`mislabel`), proponent retrieval — MRR and precision@k, fact
tracing — (`retrieval`); `stats` holds the shared correlations.
"""

from attribution.evaluation.lds import (
    LdsResult,
    linear_datamodeling_score,
    retrained_losses,
    sample_subsets,
)
from attribution.evaluation.leakage import LeakageResult, copy_ranks, leakage_detection
from attribution.evaluation.loo import LooResult, leave_one_out, loo_correlation, query_losses
from attribution.evaluation.mirrored import Correlation, mirrored_correlation
from attribution.evaluation.mislabel import (
    AucDifference,
    MislabelReport,
    auc_difference,
    detection_curve,
    mislabel_report,
    recall_at_fraction,
    roc_auc,
)
from attribution.evaluation.retrieval import (
    mean_reciprocal_rank,
    precision_at_k,
    proponent_ranks,
    query_precisions,
    retrieval_difference,
)
from attribution.evaluation.stats import (
    PairedDifference,
    average_ranks,
    mean_difference,
    paired_bootstrap,
    pearson,
    spearman,
)

__all__ = [
    "AucDifference",
    "Correlation",
    "LdsResult",
    "LeakageResult",
    "LooResult",
    "MislabelReport",
    "PairedDifference",
    "auc_difference",
    "average_ranks",
    "copy_ranks",
    "detection_curve",
    "leakage_detection",
    "leave_one_out",
    "linear_datamodeling_score",
    "loo_correlation",
    "mean_difference",
    "mean_reciprocal_rank",
    "mirrored_correlation",
    "mislabel_report",
    "paired_bootstrap",
    "pearson",
    "precision_at_k",
    "proponent_ranks",
    "query_losses",
    "query_precisions",
    "recall_at_fraction",
    "retrained_losses",
    "retrieval_difference",
    "roc_auc",
    "sample_subsets",
    "spearman",
]
