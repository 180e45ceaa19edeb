"""The optional pretrained-weights input: the definition's wiring, and local-run's defaults and local weights file."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from pipeline.cli import UsageError
from pipeline.dag import steps_of
from pipeline.definition import synth
from pipeline.local import command
from pipeline.local.s3 import LocalS3
from pipeline.settings import load_settings

import contract

PARAMETER = {"Get": "Parameters.PretrainedWeightsS3Uri"}


@pytest.fixture(scope="module")
def built():
    result = synth(load_settings({}, environ={}))
    return result, result.document


def job_arguments(node) -> dict:
    arguments = node.document["Arguments"]
    return arguments.get("TrainingJobDefinition", arguments)


@pytest.mark.slow
def test_weights_input_reaches_tuning_both_trainings_and_evaluations(built) -> None:
    result, document = built
    (parameter,) = [p for p in document["Parameters"] if p["Name"] == "PretrainedWeightsS3Uri"]
    # SageMaker refuses an empty S3Uri: the default is an object every job has, the code archive.
    assert parameter["DefaultValue"] == result.assets.code.s3_uri
    assert parameter["DefaultValue"].endswith("/" + contract.NO_WEIGHTS_PLACEHOLDER)
    fed = set()
    for name, node in steps_of(document).items():
        arguments = job_arguments(node)
        for channel in arguments.get("InputDataConfig", []):
            if channel["ChannelName"] == contract.PRETRAINED_CHANNEL:
                assert channel["DataSource"]["S3DataSource"]["S3Uri"] == PARAMETER
                fed.add(name)
        for item in arguments.get("ProcessingInputs", []):
            if item["InputName"] == contract.PRETRAINED_CHANNEL:
                assert item["S3Input"]["S3Uri"] == PARAMETER
                assert item["S3Input"]["LocalPath"] in arguments["AppSpecification"]["ContainerArguments"]
                fed.add(name)
    expected = {"ExtractFeatures", "TuneHyperparameters", "TrainSingleInstance", "TrainMultiInstance",
                "EvaluateSingleInstance", "EvaluateMultiInstance"}
    assert expected <= fed, fed


def test_no_static_freeze_flag_reaches_a_job(built) -> None:
    """The frozen-backbone default follows the weights inside train.py; a static value could not, for every PretrainedWeights."""
    _, document = built
    for node in steps_of(document).values():
        hyperparameters = job_arguments(node).get("HyperParameters") or job_arguments(node).get("StaticHyperParameters") or {}
        assert "freeze_backbone" not in hyperparameters


def document_of(built) -> dict:
    return built[1]


def test_local_run_defaults_without_weights_train_a_small_whole_network(built) -> None:
    document = document_of(built)
    real = command.local_choices(document, {}, sample=False)
    assert {k: v for k, (v, _) in real.items()} == {"PretrainedWeights": "none", "Backbone": "resnet18",
                                                   "ImageSize": 64}
    assert all(reason for _, reason in real.values())
    sample = command.local_overrides(document, {"ImageSize": 48}, sample=True)
    assert sample == {"PretrainedWeights": "none", "Backbone": "resnet18"}
    with_weights = command.local_overrides(document, {"PretrainedWeightsS3Uri": "s3://b/w.pth"}, sample=False)
    assert with_weights == {}  # PretrainedWeights=imagenet then reads the file from the pretrained channel
    # the tuning limits are settings now: local-run caps the trials unless told (--max-tuning-jobs) or given weights
    assert command.local_trials({}, sample=True, flag=None)[0] == 2
    assert command.local_trials({}, sample=False, flag=None)[0] == 2
    assert command.local_trials({}, sample=True, flag=1) is None
    assert command.local_trials({"PretrainedWeightsS3Uri": "s3://b/w.pth"}, sample=False, flag=None) is None


def test_a_local_weights_file_becomes_the_parameter_in_local_s3(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    settings = load_settings({}, environ={})
    given = {"PretrainedWeightsS3Uri": str(weights)}
    assert command.local_weights_file(given, None) == weights
    assert command.local_weights_file({}, weights) == weights
    assert command.local_weights_file({"PretrainedWeightsS3Uri": "s3://bucket/w.pth"}, None) is None
    uri = command.weights_uri(settings, weights)
    s3 = LocalS3(tmp_path / "s3")
    s3.put(uri, weights.read_bytes())
    channel = tmp_path / "channel"
    s3.download(uri, channel)
    assert (channel / "resnet18.pth").read_bytes() == weights.read_bytes()
    with pytest.raises(UsageError, match=r"PretrainedWeightsS3Uri=.*missing.pth: no such file; give a .pth state dict"):
        command.local_weights_file({"PretrainedWeightsS3Uri": str(tmp_path / "missing.pth")}, None)
    with pytest.raises(UsageError, match="disagree"):
        command.local_weights_file({"PretrainedWeightsS3Uri": "s3://b/other.pth"}, weights)


def test_local_run_flag_is_parsed() -> None:
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    args = parser.parse_args(["local-run", "--pretrained-weights", "/w/resnet50.pth"])
    assert args.pretrained_weights == Path("/w/resnet50.pth")
