"""Dog-breed classifier on Amazon SageMaker: the pipeline as code.

The core install is what AWS CodeBuild needs to synthesize and publish the
pipeline (the SageMaker Python SDK v3's sagemaker-mlops, boto3, rich). Torch and
the test tools live in the ``dev`` extra.
"""
from setuptools import find_packages, setup

DEV = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy",
    "scikit-learn",  # tests/real_images.py: the load_digits scans ship in its wheel
    "scikit-image",  # tests/real_images.py: the photos of skimage.data ship in its wheel (benchmarks/model_quality.py)
    "Pillow",
    "pytest",
    "pytest-xdist",  # `make test` and `make check` run two workers
    "jsonschema",
    "moto[server]>=5.1,<6",
    "cfn-lint",
    "parliament",
    # The open-source toolkits the SageMaker PyTorch containers run train.py and inference.py under.
    "sagemaker-training==5.1.4",
    "sagemaker-pytorch-training==3.0.0",
    "sagemaker-inference==1.10.1",
    "sagemaker-pytorch-inference==2.0.25",
    "torchserve==0.12.0",
    "torch-model-archiver==0.12.0",
    "setuptools<81",  # sagemaker-pytorch-inference imports pkg_resources, which setuptools 81 removed
    "hypothesis",
    "ruff==0.17.6",  # ruff.toml; `make test` runs `ruff check .` first
]

setup(
    name="dogbreed-pipeline",
    version="0.1.0",
    description="A SageMaker Pipeline for a PyTorch dog-breed classifier, built offline and published from CodeBuild.",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "steps", "steps.*"]),
    package_data={"pipeline": ["definition.schema.json"]},
    install_requires=[
        # The pipeline steps (sagemaker.mlops.workflow); it brings sagemaker-core (shapes, Processor, image URIs),
        # sagemaker-train (ModelTrainer, HyperparameterTuner) and sagemaker-serve (ModelBuilder.register).
        "sagemaker-mlops>=1.27.0,<1.28",
        "boto3",
        "rich>=13",
        "regex",  # pipeline/constraints.py: botocore's Java patterns use \p{...} classes, which re lacks
        "PyYAML",  # pipeline/publish/bootstrap.py reads infra/template.yaml
    ],
    extras_require={"dev": DEV},
    entry_points={"console_scripts": ["dogbreed=pipeline.cli:main"]},
)
