"""The service-limit checker on hand-made arguments, the processing bootstrap run by bash, and run-time refusals."""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.constraints import Walk, check_value, input_member, parameter_value_findings
from pipeline.definition import load_contract
from pipeline.parameters import OUT_OF_RANGE, ParameterError, parameter_values
from pipeline.validate import parameter_landings
from steps.processing import bootstrap_command
from sources import ROOT

BOOTSTRAP = bootstrap_command(load_contract(ROOT).PROCESSING_FAILURE_FILE)


def findings(value, shape, parameters=None) -> list[str]:
    walk = Walk("step S", parameters or {})
    check_value(walk, value, shape, "Arguments")
    return [str(f) for f in walk.findings]


def processing_arguments(**app) -> dict:
    return {"AppSpecification": {"ImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/x:1", **app}}


CREATE_PROCESSING = input_member("sagemaker", "CreateProcessingJob")
CREATE_TRAINING = input_member("sagemaker", "CreateTrainingJob")


def test_a_string_one_character_over_its_max_is_reported_with_its_path():
    assert findings(processing_arguments(ContainerEntrypoint=["/bin/bash", "-c", "x" * 256]), CREATE_PROCESSING) == []
    assert findings(processing_arguments(ContainerEntrypoint=["/bin/bash", "-c", "x" * 257]), CREATE_PROCESSING) == [
        "step S, Arguments.AppSpecification.ContainerEntrypoint[2]: 257 characters; "
        "allowed: at most 256 characters (ContainerEntrypointString)"]


def test_a_list_over_its_max_is_reported():
    assert findings(processing_arguments(ContainerEntrypoint=["a"] * 101), CREATE_PROCESSING) == [
        "step S, Arguments.AppSpecification.ContainerEntrypoint: 101 items; allowed: at most 100 items (ContainerEntrypoint)"]


def test_a_value_off_its_pattern_is_reported():
    (finding,) = findings({"ProcessingJobName": "prepare_data"}, CREATE_PROCESSING)
    assert finding.startswith("step S, Arguments.ProcessingJobName: \"prepare_data\" does not match; allowed: values matching ")
    assert "(ProcessingJobName)" in finding


def test_a_value_outside_its_enum_is_reported():
    arguments = {"ResourceConfig": {"InstanceType": "ml.m5.enormous", "InstanceCount": 1, "VolumeSizeInGB": 50}}
    (finding,) = findings(arguments, CREATE_TRAINING)
    assert finding.startswith('step S, Arguments.ResourceConfig.InstanceType: "ml.m5.enormous" is not among them; '
                              "allowed: one of ml.m4.xlarge, ")
    assert findings({"ResourceConfig": {"InstanceType": "ml.m5.xlarge"}}, CREATE_TRAINING) == []


def test_a_number_over_its_maximum_is_reported():
    arguments = {"ProcessingResources": {"ClusterConfig": {"InstanceCount": 101, "InstanceType": "ml.m5.xlarge",
                                                           "VolumeSizeInGB": 30}}}
    assert findings(arguments, CREATE_PROCESSING) == [
        "step S, Arguments.ProcessingResources.ClusterConfig.InstanceCount: 101 is more; "
        "allowed: at most 100 (ProcessingInstanceCount)"]


def test_map_keys_and_values_are_checked():
    (finding,) = findings({"HyperParameters": {"k" * 257: "1"}}, CREATE_TRAINING)
    assert "key \"kkk" in finding and "257 characters; allowed: at most 256 characters (HyperParameterKey)" in finding
    (finding,) = findings({"HyperParameters": {"classes": "x" * 2501}}, CREATE_TRAINING)
    assert finding.startswith('step S, Arguments.HyperParameters["classes"]: 2501 characters; allowed: at most 2500')


def test_java_unicode_classes_in_patterns_are_applied():
    tags = input_member("sagemaker", "CreatePipeline", "Tags")
    assert findings([{"Key": "équipe", "Value": "vision été"}], tags) == []
    (finding,) = findings([{"Key": "team", "Value": "a;b"}], tags)
    assert 'Arguments[0].Value: "a;b" does not match' in finding and "(TagValue)" in finding


def test_a_parameter_reference_is_checked_with_its_default_and_allowed_values():
    parameters = {"Type": {"Name": "Type", "Type": "String", "DefaultValue": "ml.m5.xlarge",
                           "EnumValues": ["ml.m5.xlarge", "ml.m5.gigantic"]}}
    arguments = {"ResourceConfig": {"InstanceType": {"Get": "Parameters.Type"}}}
    (finding,) = findings(arguments, CREATE_TRAINING, parameters)
    assert finding.startswith("step S, Arguments.ResourceConfig.InstanceType: parameter Type's allowed value 'ml.m5.gigantic': ")
    walk = Walk("step S", parameters)
    check_value(walk, arguments, CREATE_TRAINING, "Arguments")
    (landing,) = walk.landings["Type"]
    assert landing.path == "Arguments.ResourceConfig.InstanceType"
    assert parameter_value_findings("Type", "ml.c5.xlarge", [landing]) == []
    assert len(parameter_value_findings("Type", "ml.nope", [landing])) == 1


def test_a_join_is_checked_with_the_parameters_defaults_and_a_type_mismatch_is_reported():
    parameters = {"Prefix": {"Name": "Prefix", "Type": "String", "DefaultValue": "p" * 250}}
    join = {"Std:Join": {"On": "-", "Values": [{"Get": "Parameters.Prefix"}, "0123456789"]}}
    (finding,) = findings({"AppSpecification": {"ContainerEntrypoint": [join]}}, CREATE_PROCESSING, parameters)
    assert "ContainerEntrypoint[0] (joined with the parameters' defaults): 261 characters" in finding
    (finding,) = findings({"ResourceConfig": {"InstanceCount": join}}, CREATE_TRAINING, parameters)
    assert finding == ("step S, Arguments.ResourceConfig.InstanceCount: Std:Join gives a string; "
                       "allowed: an integer (TrainingInstanceCount)")


def test_what_upsert_sends_besides_the_definition_is_within_the_limits():
    from pipeline.publish.pipeline_resource import pipeline_attributes
    from pipeline.publish.upsert import request_problems
    from pipeline.settings import load_settings

    settings = load_settings({}, environ={})
    assert request_problems(settings, 2) == []
    attributes = pipeline_attributes(settings, 2)
    shape = input_member("sagemaker", "CreatePipeline")
    assert findings({**attributes, "PipelineDisplayName": "Dog breed classifier (dogbreed)"}, shape) == [
        "step S, Arguments.PipelineDisplayName: \"Dog breed classifier (dogbreed)\" does not match; "
        "allowed: values matching '[a-zA-Z0-9](-*[a-zA-Z0-9]){0,255}' (PipelineName)"]


# ---------------------------------------------------------------- the bootstrap, run by bash

def job_root(tmp_path: Path, script: str) -> Path:
    """A container file system with the code tarball where the job's code input puts it."""
    code = tmp_path / "src"
    code.mkdir()
    (code / "job.py").write_text(script)
    root = tmp_path / "root"
    (root / "opt/ml/processing/input/code").mkdir(parents=True)
    (root / "opt/ml/output").mkdir(parents=True)
    with tarfile.open(root / "opt/ml/processing/input/code/sourcedir.tar.gz", "w:gz") as tar:
        tar.add(code / "job.py", arcname="job.py")
    return root


def run_bootstrap(root: Path, *arguments: str) -> subprocess.CompletedProcess:
    from pipeline.local.jobs import rewrite_opt_ml

    command = rewrite_opt_ml(["/bin/bash", "-c", BOOTSTRAP, "bootstrap", *arguments], root)
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
def test_the_bootstrap_keeps_the_script_exit_code_and_failure_message(tmp_path):
    assert len(BOOTSTRAP) <= 256
    script = ("import sys, pathlib\n"
              "pathlib.Path(sys.argv[2]).write_text('bad input: ' + sys.argv[1])\n"
              "sys.exit(3)\n")
    root = job_root(tmp_path, script)
    message = root / "opt/ml/output/message"
    result = run_bootstrap(root, "job.py", "images", str(message))
    assert result.returncode == 3, result.stderr
    assert message.read_text() == "bad input: images"
    assert (root / "opt/ml/processing/code/job.py").is_file()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
def test_a_failing_bootstrap_writes_the_failing_command_as_the_failure_message(tmp_path):
    root = job_root(tmp_path, "print('never')\n")
    (root / "opt/ml/processing/input/code/sourcedir.tar.gz").write_bytes(b"not a tarball")
    result = run_bootstrap(root, "job.py")
    assert result.returncode != 0
    assert (root / "opt/ml/output/message").read_text().strip() == "bootstrap: tar -xzf ../input/code/sourcedir.tar.gz failed"


# ---------------------------------------------------------------- run-time values

@pytest.fixture(scope="module")
def definition(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "pipeline.json"
    assert main(["synth", "--out", str(out)]) == 0
    return out, json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("pairs, message", [
    (["ImageSize=0"], "--param ImageSize=0: ImageSize must be 32 to 1024, since train.py refuses a side under 32 pixels"),
    (["EndpointMinCapacity=3", "EndpointMaxCapacity=2"],
     "--param EndpointMinCapacity=3: EndpointMinCapacity (3) must not exceed EndpointMaxCapacity (2)"),
    (["TrainingInstanceType=ml.m5.gigantic"], "--param TrainingInstanceType=ml.m5.gigantic: where the pipeline uses "
                                              "TrainingInstanceType, step "),
])
def test_run_values_out_of_range_are_refused_naming_the_parameter_and_the_range(definition, pairs, message):
    with pytest.raises(ParameterError) as error:
        parameter_values(pairs, definition[1])
    assert error.value.problem == OUT_OF_RANGE
    assert str(error.value).startswith(message), str(error.value)
    assert parameter_values(["ImageSize=64", "EndpointMaxCapacity=4"], definition[1]) == {"ImageSize": 64, "EndpointMaxCapacity": 4}


def test_every_numeric_parameter_lands_somewhere_or_has_a_range(definition):
    from steps.parameters import PARAMETER_RANGES

    landings = parameter_landings(definition[1])
    for parameter in definition[1]["Parameters"]:
        if parameter["Type"] in ("Integer", "Float"):
            assert parameter["Name"] in PARAMETER_RANGES or landings.get(parameter["Name"]), parameter["Name"]


@pytest.mark.slow
def test_local_run_refuses_an_out_of_range_value_before_anything_starts(definition, tmp_path, capsys):
    path, _ = definition
    workdir = tmp_path / "run"
    code = main(["local-run", "--definition", str(path), "--workdir", str(workdir), "--param", "ImageSize=0"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("dogbreed local-run: --param ImageSize=0: ImageSize must be 32 to 1024"), err
    assert not workdir.exists()
    code = main(["local-run", "--definition", str(path), "--workdir", str(workdir), "--param", "EndpointMinCapacity=6"])
    assert code == 2  # the definition's EndpointMaxCapacity is 5
    assert "EndpointMinCapacity (6) must not exceed EndpointMaxCapacity (5)" in capsys.readouterr().err
    assert not workdir.exists()
