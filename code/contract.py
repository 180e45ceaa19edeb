"""The contract between the container scripts and the pipeline definition.

Standard library only: the pipeline loads this file by path (it never imports
torch), and the scripts import it beside themselves inside the containers.
Metric names, the metric log line, file names and JSON paths live here once.
"""
from __future__ import annotations

import re
from typing import Mapping

# Training -> tuner: one line per epoch, e.g.
#   epoch=3 train_loss=0.412300 val_loss=0.523400 val_accuracy=0.851200 best_val_loss=0.501200
# best_val_loss is the lowest val_loss so far: what the saved model (the best
# epoch, see train.py's early stopping) achieves. The tuner ranks trials by the
# last value it finds, so it is the objective rather than val_loss.
METRIC_NAMES = ("train_loss", "val_loss", "val_accuracy", "best_val_loss")
OBJECTIVE_METRIC = "best_val_loss"
OBJECTIVE_TYPE = "Minimize"
_FLOAT = r"([-+]?(?:[0-9]*\.)?[0-9]+(?:[eE][-+]?[0-9]+)?)"

# Channels the training job reads (SM_CHANNEL_TRAIN, SM_CHANNEL_VALID); the
# test split is never given to training, only to evaluation.
TRAIN_CHANNEL = "train"
VALID_CHANNEL = "valid"
TEST_CHANNEL = "test"
PRETRAINED_CHANNEL = "pretrained"
# The pretrained channel's default source is the job's own code archive (an object
# every job has; SageMaker refuses an empty S3 URI): a channel holding only this
# file supplies no weights.
NO_WEIGHTS_PLACEHOLDER = "sourcedir.tar.gz"
# The tuning trials read only this channel (SM_CHANNEL_FEATURES): the frozen
# backbone's features of train and valid, written once by extract_features.py.
FEATURES_CHANNEL = "features"
FEATURES_HEADER_FILE = "features.json"
FEATURES_SPLIT_FILES = {TRAIN_CHANNEL: "train.pt", VALID_CHANNEL: "valid.pt"}
SPLITS = (TRAIN_CHANNEL, VALID_CHANNEL, TEST_CHANNEL)

# Where a job's script writes the one line SageMaker shows when the job fails:
# DescribeTrainingJob FailureReason, DescribeProcessingJob ExitMessage.
TRAINING_FAILURE_FILE = "/opt/ml/output/failure"
PROCESSING_FAILURE_FILE = "/opt/ml/output/message"

# Files in the model directory (model.tar.gz) written by train.py.
MODEL_FILE = "model.pth"
CLASSES_FILE = "classes.json"
MODEL_INFO_FILE = "model_info.json"
MODEL_CODE_DIR = "code"  # inference code packed beside the weights
INFERENCE_SCRIPT = "inference.py"
MODEL_ARCHIVE = "model.tar.gz"  # what SageMaker packs a model directory into

# The serving artifact: the network the endpoint runs (fp32 traced and frozen, or int8), built once
# by evaluate.py on the inference image's torch and measured there, saved with torch.jit.save in
# the model archive the pipeline registers. model_info.json describes it under SERVING_INFO_KEY
# (file, precision, torch version, device, sha256); model_fn loads it instead of building.
SERVING_MODEL_FILE = "serving_model.pt"
SERVING_INFO_KEY = "serving_artifact"

# Files written by preprocess.py and evaluate.py.
MANIFEST_FILE = "manifest.json"
EVALUATION_FILE = "evaluation.json"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
TEST_PREDICTIONS_FILE = "test_predictions.json"  # {"<class>/<file>": "<top-1 class>"} of the served artifact

# Where the endpoint check reads how many classes the prepared data has, in manifest.json.
CLASS_COUNT_JSON_PATH = "class_count"

# Where the ConditionStep reads the test accuracy in evaluation.json.
ACCURACY_JSON_PATH = "multiclass_classification_metrics.accuracy.value"

# Serving precision: the pipeline parameter's values; evaluate.py decides which one
# is served and writes it at SERVED_PRECISION_JSON_PATH in evaluation.json, the
# model package passes it to the endpoint in INFERENCE_PRECISION_ENV, and
# inference.py's model_fn follows it. int8 is calibrated on the validation images
# that train.py stores in CALIBRATION_DIR of the model directory.
PRECISIONS = ("fp32", "int8")
DEFAULT_PRECISION = "fp32"
INFERENCE_PRECISION_ENV = "DOGBREED_INFERENCE_PRECISION"
SERVED_PRECISION_JSON_PATH = "inference_precision.served"
CALIBRATION_DIR = "calibration"


def format_metric_line(epoch: int, metrics: Mapping[str, float]) -> str:
    """The line the tuner parses; every name in METRIC_NAMES must be present."""
    missing = [name for name in METRIC_NAMES if name not in metrics]
    if missing:
        raise ValueError(f"metric line lacks {', '.join(missing)}")
    values = " ".join(f"{name}={metrics[name]:.6f}" for name in METRIC_NAMES)
    return f"epoch={epoch} {values}"


def metric_regex(name: str) -> str:
    """The regex whose first group captures ``name`` from a metric line."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRIC_NAMES)}")
    return rf"epoch=[0-9]+ .*\b{re.escape(name)}={_FLOAT}"


def metric_definitions() -> list[dict[str, str]]:
    """SageMaker ``MetricDefinitions`` for every metric the training script logs."""
    return [{"Name": name, "Regex": metric_regex(name)} for name in METRIC_NAMES]
