"""AWS for a local run: moto's server on 127.0.0.1 and an environment that can reach nothing else.

While a run lasts, the process environment holds fake credentials, the run's
region, ``AWS_ENDPOINT_URL`` pointing at the embedded moto server and
``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` at the local endpoint data plane, so
every boto3 client made in the run (the Lambda handlers' included) talks to
127.0.0.1 and no request can reach a real account.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator, Mapping

import boto3
from botocore.config import Config
from moto.sagemaker.models import sagemaker_backends

from pipeline.local.callbacks import CallbackApi, MotoWithCallbacks

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local-run", "AWS_SECRET_ACCESS_KEY": "local-run"}
QUIET_LOGGERS = ("werkzeug", "moto", "botocore.credentials")


class EmbeddedMoto:
    """moto's server in a thread of this process, on a free loopback port, with empty backends, and the
    callback API of CallbackSteps that moto lacks (``pipeline.local.callbacks``) in front of it."""

    def __init__(self) -> None:
        self._server: MotoWithCallbacks | None = None
        self._levels: dict[str, int] = {}
        self.url = ""

    @property
    def callbacks(self) -> CallbackApi:
        return self._server.api

    def __enter__(self) -> "EmbeddedMoto":
        self._levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
        for name in QUIET_LOGGERS:  # the server logs every request
            logging.getLogger(name).setLevel(logging.ERROR)

        self._server = MotoWithCallbacks()
        self._server.start()
        self.url = self._server.url
        self.reset()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            try:
                self.reset()
            finally:
                self._server.stop()
                self._server = None
                for name, level in self._levels.items():
                    logging.getLogger(name).setLevel(level)

    def reset(self) -> None:
        """Empty moto's backends (they live in this process, shared with any in-process mock)."""
        self._server.reset()


def set_endpoint_status(region: str, endpoint_name: str, status: str) -> bool:
    """Put an endpoint of the embedded SageMaker in ``status`` (moto makes every endpoint InService at once);
    False when no account of the embedded backend has it."""
    for account in list(sagemaker_backends.keys()):
        endpoint = sagemaker_backends[account][region].endpoints.get(endpoint_name)
        if endpoint is not None:
            endpoint.endpoint_status = status
            return True
    return False


def client(service: str, endpoint_url: str, region: str) -> Any:
    """A boto3 client for the embedded services, with fake credentials."""
    return boto3.session.Session(
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=region,
    ).client(service, endpoint_url=endpoint_url, config=Config(retries={"max_attempts": 2, "mode": "standard"}))


def run_environment(region: str, moto_url: str, runtime_url: str, config_dir: str) -> dict[str, str]:
    """The AWS variables of a local run; every AWS variable not named here is removed while it lasts."""
    return {
        **FAKE_CREDENTIALS,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime_url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.path.join(config_dir, "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": os.path.join(config_dir, "aws-credentials"),
    }


@contextmanager
def aws_environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in os.environ, with every other AWS_* variable removed, and restore it all afterwards."""
    saved = {name: value for name, value in os.environ.items() if name.startswith("AWS_") or name in values}
    previous_session = boto3.DEFAULT_SESSION
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    os.environ.update(values)
    boto3.DEFAULT_SESSION = None  # the next boto3.client() builds a session from this environment
    try:
        yield
    finally:
        for name in list(os.environ):
            if name.startswith("AWS_") or name in values:
                del os.environ[name]
        os.environ.update(saved)
        boto3.DEFAULT_SESSION = previous_session


def plain(value: Any) -> Any:
    """A boto3 response as JSON values: datetimes become ISO strings, ResponseMetadata goes."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items() if key != "ResponseMetadata"}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value
