"""The pipeline's ``model`` section: validation, and the options it hands the ONNX backend."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.config import ModelRuntimeConfig


def test_backend_options_pass_only_what_is_set() -> None:
    assert ModelRuntimeConfig().backend_options() == {"intra_op_threads": 0, "inter_op_threads": 1}
    config = ModelRuntimeConfig(intra_op_threads=1, input_size=(448, 448), session_batch=2)
    assert config.backend_options() == {
        "intra_op_threads": 1,
        "inter_op_threads": 1,
        "input_size": (448, 448),
        "session_batch": 2,
    }


@pytest.mark.parametrize("value", [0, -1, 65])
def test_session_batch_is_bounded(value: int) -> None:
    with pytest.raises(ValidationError, match="session_batch"):
        ModelRuntimeConfig(session_batch=value)
