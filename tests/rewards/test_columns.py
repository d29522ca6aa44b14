"""The column rule (mmgrpo.rewards.columns) is one function, used by the trainer and the reward server alike."""

from __future__ import annotations

import pytest
import torch

from mmgrpo.core.errors import UserError
from mmgrpo.rewards import columns
from mmgrpo.train import scoring


def test_scoring_uses_the_rewards_layers_column_rule():
    # moved to layer 3 so the reward server can apply it (mmgrpo.rewards may not import mmgrpo.train); the old
    # imports from mmgrpo.train.scoring keep working and are the same objects
    for name in ("to_column", "_one_number", "_check_finite", "FLOAT32_MAX"):
        assert getattr(scoring, name) is getattr(columns, name)
    assert columns.to_column("r", [1, None], 2).tolist()[0] == 1.0
    with pytest.raises(UserError, match="too large for fp32"):
        columns.to_column("r", torch.tensor([1e39], dtype=torch.float64), 1)


def test_a_big_endian_numpy_column_is_read():
    """torch.from_numpy refuses a big-endian array ('>f4', as some file readers return): every request to a served
    reward returning one was a 500."""
    import numpy as np

    from mmgrpo.rewards.columns import to_column

    assert to_column("r", np.array([1.5, 2.5], dtype=">f4"), 2).tolist() == [1.5, 2.5]
    assert to_column("r", np.array([1, 2], dtype=">i8"), 2).tolist() == [1.0, 2.0]
