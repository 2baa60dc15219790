"""mypy plugin: types `mesh.<endpoint>` on an ActorMesh[T] as Endpoint[P, R] from T's @endpoint method, and lets
its verbs take a StoredRows[X] wherever the method takes an X (the actor fetches the rows before the call)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from mypy.nodes import Decorator, TypeInfo
from mypy.plugin import AttributeContext, MethodSigContext, Plugin
from mypy.types import AnyType, CallableType, Instance, Type, TypeOfAny, UnionType, get_proper_type

_MESH = "rlmesh.mesh.mesh.ActorMesh"
_ENDPOINT_METHOD = "rlmesh.mesh.endpoint.EndpointMethod"
_BOUND_ENDPOINT = "rlmesh.mesh.mesh.Endpoint"
_STORED_ENDPOINT = "rlmesh.mesh.mesh.StoredEndpoint"
_STORED_ROWS = "rlmesh.mesh.stored.StoredRows"
_VERBS = {
    f"{cls}.{verb}" for cls in (_BOUND_ENDPOINT, _STORED_ENDPOINT) for verb in ("all", "choose", "shard", "call_one")
}


class RlmeshPlugin(Plugin):
    def get_attribute_hook(self, fullname: str) -> Callable[[AttributeContext], Type] | None:
        prefix = _MESH + "."
        if fullname.startswith(prefix) and not fullname[len(prefix) :].startswith("_"):
            return partial(_endpoint_type, fullname[len(prefix) :])
        return None

    def get_method_signature_hook(self, fullname: str) -> Callable[[MethodSigContext], CallableType] | None:
        return _accept_stored_rows if fullname in _VERBS else None


def _accept_stored_rows(ctx: MethodSigContext) -> CallableType:
    signature = ctx.default_signature
    modules = ctx.api.modules  # type: ignore[attr-defined]
    module, _, name = _STORED_ROWS.rpartition(".")
    if signature.param_spec() is not None or module not in modules:
        return signature  # inside the verbs' own definitions, or nothing stored in scope
    info = modules[module].names[name].node
    assert isinstance(info, TypeInfo)
    widened = [UnionType.make_union([arg, Instance(info, [arg])]) for arg in signature.arg_types]
    return signature.copy_modified(arg_types=widened)


def _endpoint_type(name: str, ctx: AttributeContext) -> Type:
    mesh = get_proper_type(ctx.type)
    if not isinstance(mesh, Instance) or not mesh.args:
        return ctx.default_attr_type
    actor = get_proper_type(mesh.args[0])
    if not isinstance(actor, Instance):
        return ctx.default_attr_type  # ActorMesh[Any]: nothing to check against
    symbol = actor.type.get(name)
    if symbol is None:
        ctx.api.fail(f'"{actor.type.name}" has no endpoint "{name}"', ctx.context)
        return AnyType(TypeOfAny.from_error)
    declared = get_proper_type(symbol.node.var.type) if isinstance(symbol.node, Decorator) else None
    if not isinstance(declared, Instance) or declared.type.fullname != _ENDPOINT_METHOD:
        message = f'"{actor.type.name}.{name}" is not an @endpoint; decorate it to call it through a mesh'
        ctx.api.fail(message, ctx.context)
        return AnyType(TypeOfAny.from_error)
    module, _, cls_name = _BOUND_ENDPOINT.rpartition(".")
    # The checker (not its plugin interface type) holds the module table; rlmesh.mesh.mesh is loaded by now.
    bound = ctx.api.modules[module].names[cls_name].node  # type: ignore[attr-defined]
    assert isinstance(bound, TypeInfo)
    return Instance(bound, list(declared.args))


def plugin(version: str) -> type[Plugin]:
    return RlmeshPlugin
