"""Training glue shared by all methods: fold preparation, Lightning fit, run directories, prediction."""

from cmrcnet.training.fit import FoldData, load_samples, prepare_fold, train
from cmrcnet.training.predict import TrainedRun, load_run, predict_sample, predict_streaming, write_h5ad_atomic

__all__ = [
    "FoldData",
    "TrainedRun",
    "load_run",
    "load_samples",
    "predict_sample",
    "predict_streaming",
    "prepare_fold",
    "train",
    "write_h5ad_atomic",
]
