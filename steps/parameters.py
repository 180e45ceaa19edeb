"""Pipeline parameters: everything a run may vary without a rebuild.

Each parameter is defined once here; the definition lists them in this order,
and Studio shows them with their defaults when someone starts a run.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from sagemaker.core.workflow.parameters import ParameterFloat, ParameterInteger, ParameterString

# What a numeric parameter may be beyond what the API shapes where it lands allow (pipeline.validate
# checks those): (least, most or None, why). Checked on the defaults by synth and on a run's values by
# `dogbreed start` and `dogbreed local-run` before anything starts.
PARAMETER_RANGES = {
    "ImageSize": (32, 1024, "train.py refuses a side under 32 pixels (a ResNet's five halvings); "
                            "PrepareData writes 256-pixel images, so more than 1024 only upsamples"),
    "MultiInstanceCount": (1, 100, "instances of one training job (SageMaker's default quota is lower)"),
    "AccuracyThreshold": (0.0, 1.0, "a test accuracy is a fraction"),
    "EndpointInitialInstanceCount": (1, None, "an endpoint needs an instance"),
    "EndpointMinCapacity": (1, None, "auto scaling keeps at least one instance of a real-time endpoint"),
    "EndpointMaxCapacity": (1, None, "auto scaling keeps at least one instance of a real-time endpoint"),
    "EndpointTargetInvocationsPerInstance": (0.001, None, "target tracking needs a positive target"),
    "EndpointWaitMinutes": (1, 720, "the wait-endpoint function gives up after at most 12 hours of polling"),
    "DeploymentStepPercent": (10, 50, "SageMaker takes a canary of at most 50% and linear steps of 10 to 50% of the new fleet"),
    "DeploymentBakeSeconds": (0, 3600, "SageMaker waits at most an hour after a traffic step (WaitIntervalInSeconds)"),
}
# (smaller, larger, why): a run's value of the first must not exceed the second's.
PARAMETER_ORDER = (
    ("EndpointMinCapacity", "EndpointMaxCapacity", "auto scaling's minimum cannot exceed its maximum"),
)


@dataclass(frozen=True)
class Parameters:
    input_data_url: ParameterString
    processing_instance_type: ParameterString
    training_instance_type: ParameterString
    tuning_instance_type: ParameterString
    multi_instance_count: ParameterInteger
    backbone: ParameterString
    image_size: ParameterInteger
    horizontal_flip: ParameterString
    pretrained_weights: ParameterString
    pretrained_weights_s3_uri: ParameterString
    accuracy_threshold: ParameterFloat
    model_approval_status: ParameterString
    inference_precision: ParameterString
    endpoint_instance_type: ParameterString
    endpoint_initial_instance_count: ParameterInteger
    endpoint_min_capacity: ParameterInteger
    endpoint_max_capacity: ParameterInteger
    endpoint_target_invocations: ParameterFloat
    data_capture_s3_uri: ParameterString
    endpoint_wait_minutes: ParameterInteger
    deployment_strategy: ParameterString
    deployment_step_percent: ParameterInteger
    deployment_bake_seconds: ParameterInteger

    def as_list(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]


def define_parameters(settings, no_weights_uri: str) -> Parameters:
    """``no_weights_uri``: an object every job has (the code archive), PretrainedWeightsS3Uri's "no weights" default."""
    return Parameters(
        input_data_url=ParameterString("InputDataUrl", default_value=settings.s3_uri("data", "dogImages")),
        processing_instance_type=ParameterString("ProcessingInstanceType", default_value=settings.processing_instance_type),
        training_instance_type=ParameterString("TrainingInstanceType", default_value=settings.training_instance_type),
        tuning_instance_type=ParameterString("TuningInstanceType", default_value=settings.tuning_instance_type),
        multi_instance_count=ParameterInteger("MultiInstanceCount", default_value=7),
        backbone=ParameterString("Backbone", default_value="resnet50", enum_values=["resnet18", "resnet34", "resnet50"]),
        image_size=ParameterInteger("ImageSize", default_value=224),
        # train.py's --flip: mirrored training images suit photos of dogs; false for images a mirror changes (digits, text).
        horizontal_flip=ParameterString("HorizontalFlip", default_value="true", enum_values=["true", "false"]),
        pretrained_weights=ParameterString("PretrainedWeights", default_value="imagenet"),
        # The pretrained channel of tuning, both trainings and evaluation: a .pth state dict of the backbone (or a
        # prefix holding one) for PretrainedWeights=imagenet without internet. SageMaker refuses an empty S3 URI
        # and a static definition cannot drop an input, so the default is a placeholder train.py reads as none.
        pretrained_weights_s3_uri=ParameterString("PretrainedWeightsS3Uri", default_value=no_weights_uri),
        accuracy_threshold=ParameterFloat("AccuracyThreshold", default_value=0.7),
        model_approval_status=ParameterString(
            "ModelApprovalStatus", default_value="Approved",
            enum_values=["Approved", "PendingManualApproval", "Rejected"],
        ),
        # code/contract.py PRECISIONS (a test pins the two); int8 is served only if evaluation finds it within 1 point of fp32.
        inference_precision=ParameterString("InferencePrecision", default_value="fp32", enum_values=["fp32", "int8"]),
        endpoint_instance_type=ParameterString("EndpointInstanceType", default_value=settings.endpoint_instance_type),
        endpoint_initial_instance_count=ParameterInteger("EndpointInitialInstanceCount", default_value=1),
        endpoint_min_capacity=ParameterInteger("EndpointMinCapacity", default_value=1),
        endpoint_max_capacity=ParameterInteger("EndpointMaxCapacity", default_value=5),
        endpoint_target_invocations=ParameterFloat("EndpointTargetInvocationsPerInstance", default_value=100.0),
        data_capture_s3_uri=ParameterString("DataCaptureS3Uri", default_value=""),
        endpoint_wait_minutes=ParameterInteger("EndpointWaitMinutes", default_value=60),
        # How an update of a serving endpoint moves traffic to the new fleet; lambda/deploy_endpoint.py's STRATEGIES,
        # DEFAULT_STEP_PERCENT and DEFAULT_BAKE_SECONDS (a test pins them together).
        deployment_strategy=ParameterString("DeploymentStrategy", default_value="all-at-once",
                                            enum_values=["all-at-once", "canary", "linear"]),
        deployment_step_percent=ParameterInteger("DeploymentStepPercent", default_value=25),
        deployment_bake_seconds=ParameterInteger("DeploymentBakeSeconds", default_value=120),
    )
