"""The ``group`` input projection (the paper's concept tokens): shapes, and an item's tokens independent of the
padding it gets when batched with longer items."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from services.contracts.bundle_manifest import InputProjectionSpec
from services.modeling.input_projection import GroupProjection, build_input_projection, project_media
from services.modeling.input_projection_layout import input_projection_shapes

SPEC = InputProjectionSpec(kind="group", width=32, groups=[8, 4], num_heads=4)


def _features(n: int, tokens: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, tokens, 64), dim=-1)


def test_group_projection_makes_the_last_stage_s_tokens_per_item() -> None:
    torch.manual_seed(0)
    projection = build_input_projection(SPEC, 64, 48)
    assert isinstance(projection, GroupProjection) and SPEC.tokens_per_item == 4
    assert project_media(projection, _features(3, 20)).shape == (3, 4, 48)


def test_an_item_s_tokens_do_not_depend_on_its_padding() -> None:
    torch.manual_seed(0)
    projection = build_input_projection(SPEC, 64, 48).eval()
    short, long = _features(1, 12), _features(1, 30)
    alone = project_media(projection, short)
    batched = project_media(projection, torch.cat([F.pad(short, (0, 0, 0, 18)), long]))
    assert torch.allclose(batched[0], alone[0], atol=1e-5)
    # ... while the content of the tokens matters.
    assert not torch.allclose(project_media(projection, long)[0], alone[0], atol=1e-3)


def test_linear_is_one_token_per_pooled_vector() -> None:
    projection = build_input_projection(InputProjectionSpec(), 64, 48)
    assert InputProjectionSpec().tokens_per_item == 1
    assert project_media(projection, torch.randn(5, 64)).shape == (5, 1, 48)


def test_group_specs_are_checked() -> None:
    with pytest.raises(ValidationError):
        InputProjectionSpec(kind="group", width=30, num_heads=4)
    with pytest.raises(ValidationError):
        InputProjectionSpec(kind="group", groups=[])


@pytest.mark.parametrize("spec", [InputProjectionSpec(), SPEC, InputProjectionSpec(kind="group")])
def test_the_torch_free_layout_the_loader_checks_is_the_module_s(spec: InputProjectionSpec) -> None:
    module = build_input_projection(spec, 64, 48)
    assert input_projection_shapes(spec, 64, 48) == {k: tuple(v.shape) for k, v in module.state_dict().items()}
