"""Settings, DAG assembly, command line and publishing of the dog-breed SageMaker pipeline."""
