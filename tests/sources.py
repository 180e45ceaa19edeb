"""Where the project's sources are, for tests that read or run them."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE_DIR = ROOT / "code"
LAMBDA_DIR = ROOT / "lambda"
