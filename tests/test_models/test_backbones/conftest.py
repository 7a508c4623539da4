import json
from pathlib import Path

import pytest

# Key names and shapes of the official T/S/B checkpoints (a copy of
# shared/mlla_official_layouts.json).
LAYOUTS = Path(__file__).parents[2] / 'data' / 'mlla_official_layouts.json'


@pytest.fixture(scope='module')
def layouts() -> dict:
    with open(LAYOUTS) as f:
        return json.load(f)
