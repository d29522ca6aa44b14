import pytest
from PIL import Image


@pytest.fixture
def folder(tmp_path):
    """A folder holding a.png (32 x 24, red): the image the hostile-data rows name."""
    Image.new("RGB", (32, 24), (200, 0, 0)).save(tmp_path / "a.png")
    return tmp_path
