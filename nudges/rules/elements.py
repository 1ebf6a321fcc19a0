"""FHIR element names in a rule's FHIRPath, checked against the R4 model (fhir.resources' R4B classes).

Why: FHIRPath navigates by name and a name that does not exist is not an error, only empty. A misspelt
element (`statsu = 'final'`, `clinicalStatus.codng`, `(value as Quantity).valeu`) made a clause under `all`
never hold and one under `none` never block, and lint said `ok`. The walk follows the types it can know
(the clause's resource, then each element's type, `as`/`ofType`, `where`/`select`/`exists`/`all` on their
input) and stops, saying nothing, wherever a type is unknown (a choice element before `as`, a primitive,
`resolve()`, a bound name): what it reports is certainly a name the type does not have.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any, Union, get_args, get_origin

from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel

Node = dict[str, Any]
CHOICE = object()  # a choice element (value[x]) before `as`: its type is not known yet
ABSTRACT = {"Resource", "DomainResource", "Element", "BackboneElement"}  # contained[], and the like
KEEP = frozenset({"where", "first", "last", "tail", "single", "distinct", "take", "skip", "trace"})
CRITERIA = frozenset({"where", "exists", "all", "select", "repeat"})  # a parameter read on each input item


def model(name: str) -> type[BaseModel] | None:
    """The R4 class of a type name (`Quantity`, `FHIR.Quantity`), None for a primitive or an unknown one."""
    bare = name.removeprefix("FHIR.")
    if not bare[:1].isupper() or bare in ABSTRACT:
        return None
    try:
        found = get_fhir_model_class(bare)
    except (KeyError, ValueError, AttributeError, ImportError):
        return None
    return found if isinstance(found, type) and issubclass(found, BaseModel) else None


@functools.cache
def elements(cls: type[BaseModel]) -> dict[str, Any]:
    """Element name -> its class (None: a primitive or an abstract type; CHOICE: a choice element)."""
    found: dict[str, Any] = {"id": None, "resourceType": None, "extension": model("Extension"),
                             "modifierExtension": model("Extension")}
    for name, info in cls.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        choice = extra.get("one_of_many")
        if isinstance(choice, str):
            found[choice] = CHOICE
        found[info.alias or name] = _class_of(info.annotation)
    return found


@functools.cache
def type_names() -> frozenset[str]:
    """Every FHIR R4 type and resource name fhir.resources knows (for did-you-mean)."""
    from fhir.resources.R4B import fhirtypes

    return frozenset(n.removesuffix("Type") for n in dir(fhirtypes) if n.endswith("Type") and n[:1].isupper())


def _class_of(annotation: Any) -> type[BaseModel] | None:
    """The model class an annotation holds (Optional, List, Annotated unwrapped), None for a primitive."""
    if get_origin(annotation) in (Union, list) or type(annotation).__name__ == "UnionType":
        for arg in get_args(annotation):
            if arg is not type(None) and (found := _class_of(arg)) is not None:
                return found
        return None
    klass = getattr(annotation, "get_model_klass", None)
    if callable(klass):
        found = klass()
        if isinstance(found, type) and issubclass(found, BaseModel) and found.__name__ not in ABSTRACT:
            return found
    return None


def problems(tree: Node, resource_type: str | None,
             names: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """(the name, what is wrong with it) for each element or type name of an expression on `resource_type`
    that the R4 model does not have (none when the type is unknown); `names`: the resource type each bound
    name (`%lab`) holds."""
    root = model(resource_type) if resource_type else None
    if root is None:
        return []
    found: list[tuple[str, str]] = []
    _Walk(found, names or {}).type_of(tree, root)
    return list(dict.fromkeys(found))


def _children(node: Node) -> list[Node]:
    return [c for c in node.get("children") or () if isinstance(c, dict)]


def _identifier(node: Node) -> str:
    """The name an Identifier-holding node carries (`status`, a back-quoted `\\`div\\``)."""
    for child in _walk_down(node):
        if child.get("type") == "Identifier" and child.get("text"):
            return str(child["text"]).strip("`")
    return ""


def _walk_down(node: Node) -> Iterator[Node]:
    yield node
    for child in _children(node):
        yield from _walk_down(child)


class _Walk:
    def __init__(self, found: list[tuple[str, str]], names: Mapping[str, str]) -> None:
        self.found, self.names = found, names

    def type_of(self, node: Node, context: Any) -> Any:
        """The type `node` yields on `context` (a class, CHOICE or None), checking the names on the way."""
        kind = node.get("type")
        children = _children(node)
        if kind in (None, "TermExpression", "ParenthesizedTerm", "InvocationTerm") and len(children) == 1:
            return self.type_of(children[0], context)
        if kind == "InvocationExpression" and len(children) == 2:
            return self.invoke(children[1], self.type_of(children[0], context))
        if kind == "MemberInvocation":  # a path's first name, read on the context
            return self.member(_identifier(node), context, first=True)
        if kind == "FunctionInvocation":
            return self.function(node, context)
        if kind == "ThisInvocation":
            return context
        if kind == "IndexerExpression" and children:
            self.type_of(children[-1], None)
            return self.type_of(children[0], context)
        if kind == "TypeExpression" and len(children) == 2:
            self.type_of(children[0], context)
            named = self.type_named(str(children[1].get("text") or ""))
            return named if node.get("terminalNodeText") == ["as"] else None
        if kind == "ExternalConstantTerm":  # %patient, or a name an earlier clause bound
            name = _identifier(node)
            return model("Patient") if name == "patient" else model(self.names[name]) if name in self.names else None
        for child in children:  # operators: each side on the same context; the result is not a resource
            self.type_of(child, context)
        return None

    def type_named(self, name: str) -> type[BaseModel] | None:
        """The class of `as X` / `ofType(X)`; a capitalised name that is no FHIR type is said so."""
        found = model(name)
        bare = name.removeprefix("FHIR.")
        if found is None and bare[:1].isupper() and "." not in bare and bare not in ABSTRACT:
            from .resources import did_you_mean

            self.found.append((bare, f"'{bare}' is not a FHIR R4 type{did_you_mean(bare, type_names())}: `as` "
                                     "and `ofType` with it are always empty"))
        return found

    def invoke(self, node: Node, input_type: Any) -> Any:
        if node.get("type") == "MemberInvocation":
            return self.member(_identifier(node), input_type)
        if node.get("type") == "FunctionInvocation":
            return self.function(node, input_type)
        return None

    def member(self, name: str, on: Any, first: bool = False) -> Any:
        if not isinstance(on, type) or not name or name.startswith("_"):
            return None
        if name == on.__name__:  # `Observation.status`: a path may start with its type's name
            return on
        known = elements(on)
        if name in known:
            return known[name]
        from .resources import did_you_mean

        quoted = f"; a value is written in quotes ('{name}')" if first else ""
        self.found.append((name, f"'{name}' is not an element of {on.__name__}{did_you_mean(name, set(known))} "
                                 f"(FHIR R4): a name that does not exist is always empty{quoted}"))
        return None

    def function(self, node: Node, input_type: Any) -> Any:
        functn = next((c for c in _children(node) if c.get("type") == "Functn"), node)
        name = _identifier(functn)
        params = [p for c in _children(functn) if c.get("type") == "ParamList" for p in _children(c)]
        if name == "ofType" and params:
            return self.type_named(str(params[0].get("text") or ""))
        on_items = input_type if name in CRITERIA and input_type is not CHOICE else None
        results = [self.type_of(p, on_items) for p in params]
        if name == "select" and results:
            return results[0]
        return input_type if name in KEEP else None
