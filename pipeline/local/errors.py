"""The one error of the local runner, for every module of it (jobs, endpoints, Lambda functions, S3)."""


class LocalRunError(RuntimeError):
    """A local run cannot go on; the message says where and why."""
