"""Python runs this at start-up when this folder is on PYTHONPATH: the tests give it to the
`python -m headstart` processes they start, which then know the suite's tiny backbones."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import conftest  # noqa: E402

conftest.register_tiny_backbones()
