"""Run the pipeline definition on one machine, without AWS and without Docker (``dogbreed local-run``).

The JSON definition is what runs, so what runs here is what SageMaker would
run; ``scheduler`` decides which step runs when, and ``runners`` what each step type becomes locally.
"""
