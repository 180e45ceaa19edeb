"""Publish and run the pipeline: ``dogbreed upsert``, ``dogbreed start``, ``dogbreed diff``.

``upsert`` builds the definition once (offline, as ``synth`` does), then
publishes exactly what it refers to, each part only when it changed:

1. the assets from the manifest, to their content-addressed S3 keys (a key
   that exists already holds the same bytes, so it is not uploaded again);
2. the three Lambda functions from ``lambda.zip``: created when missing, code
   updated when its SHA-256 differs, configuration updated when it differs,
   then a version is published and the alias ``live`` (which the definition
   calls) moved to it;
3. the endpoint-wait queue's event source mapping to the wait function's ``live`` alias: created
   when missing, updated when its batch size, response types or state differ;
4. the provisioned concurrency of the invoke function's ``live`` alias: set
   when it differs from the setting, removed when the setting is 0;
5. the pipeline: created, or updated when the deployed definition or its
   display name, description, role or parallelism differ; missing tags added.

Running it again with nothing changed makes no AWS change and says so.

One module per job: ``assets``, ``functions``, ``wait_queue`` (the mapping), ``pipeline_resource`` (the SageMaker pipeline),
``upsert`` (the three in order, after checking every request), ``executions`` (``start``, ``--wait``)
and ``subcommands`` (the command line of the three commands).
"""
from pipeline.publish.subcommands import register

__all__ = ["register"]
