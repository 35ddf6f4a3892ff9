"""The tensors an input projection's weights file holds, by design, without torch: the bundle loader checks files
against it in processes that have no torch (the slim gateway). ``services.modeling.input_projection`` builds the
modules; a test keeps the two in step."""

from __future__ import annotations

from services.contracts.bundle_manifest import InputProjectionSpec


def input_projection_shapes(spec: InputProjectionSpec, in_dim: int, out_dim: int) -> dict[str, tuple[int, ...]]:
    if spec.kind == "linear":
        return {"weight": (out_dim, in_dim), "bias": (out_dim,)}
    w = spec.width
    shapes: dict[str, tuple[int, ...]] = {"in_fc.weight": (w, in_dim), "in_fc.bias": (w,)}
    for index, groups in enumerate(spec.groups):
        stage = f"stages.{index}."
        shapes[stage + "group_tokens"] = (1, groups, w)
        for norm in ("norm_inputs", "norm_groups"):
            shapes.update({stage + norm + ".weight": (w,), stage + norm + ".bias": (w,)})
        shapes.update({stage + "gather.in_proj_weight": (3 * w, w), stage + "gather.in_proj_bias": (3 * w,),
                       stage + "gather.out_proj.weight": (w, w), stage + "gather.out_proj.bias": (w,)})
        for mlp in ("group_mlp", "out_mlp"):
            shapes.update({stage + mlp + ".0.weight": (w,), stage + mlp + ".0.bias": (w,),
                           stage + mlp + ".1.weight": (4 * w, w), stage + mlp + ".1.bias": (4 * w,),
                           stage + mlp + ".3.weight": (w, 4 * w), stage + mlp + ".3.bias": (w,)})
        for linear in ("assign_query", "assign_key", "merge"):
            shapes.update({stage + linear + ".weight": (w, w), stage + linear + ".bias": (w,)})
    shapes.update({"norm.weight": (w,), "norm.bias": (w,), "out_fc.weight": (out_dim, w), "out_fc.bias": (out_dim,)})
    return shapes
