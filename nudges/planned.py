"""The planned parse of a hook call: only what the service's rules can read becomes Python objects.

A 2 MB prefetch holds thousands of vital signs and routine labs that no rule of the service looks at.
Parsing all of it with orjson builds a hundred thousand dicts, lists and strings, and freeing them after
the answer costs half as much again: the two were most of a large call. Here msgspec scans the body to
find each prefetch Bundle entry's bytes and decodes, per entry, only its head: the resource's type and,
for the types the service's index plan looks at, the elements it can look at (code elements, notes,
`valueString`, `medicationReference`; `fhir.CODE_ELEMENTS`), into small typed structs (`Heads`, built
once per rule load). The plan decides on that head; only the entries it keeps are parsed, by orjson,
into the plain dicts the pipeline has always had. The rest of the body (context and its draft orders,
single-resource prefetch values, a Bundle's other elements) is parsed by orjson in full.

The result is the body `orjson.loads` gives, less the Bundle entries no rule can read, so the cards are
the same (tests/test_planned.py runs every rule case both ways). What is odd is kept, not judged: an
entry whose head does not have the shape FHIR gives it, an entry without a resource, an
OperationOutcome, a body that is not shaped as a CDS Hooks request (the request model then says why).
Bad JSON anywhere, kept or not, is the same 400 as before.
"""

from __future__ import annotations

import codecs
from typing import Any, NoReturn, Union

import msgspec
import orjson

from .errors import BadRequest, TooDeep
from .fhir import CODE_ELEMENTS, MEDICATION_TYPES, SYSTEM_ALIASES

UNSET: Any = msgspec.UNSET


class CodingHead(msgspec.Struct, frozen=True):
    system: Any = None
    code: Any = None
    display: Any = None


class ConceptHead(msgspec.Struct, frozen=True):
    coding: tuple[CodingHead, ...] | None = None  # null where a careless export writes null: as if absent
    text: Any = None


class NoteHead(msgspec.Struct, frozen=True):
    text: Any = None


Concepts = Union[ConceptHead, tuple[ConceptHead, ...], None]  # noqa: UP007  # a runtime type for msgspec


class Kind(msgspec.Struct):
    resourceType: Any = None


class KindOnly(msgspec.Struct):
    resource: Kind | None = None


class Envelope(msgspec.Struct, forbid_unknown_fields=True):
    """A CDS Hooks request's elements, unparsed but for the prefetch keys. An element the spec does not
    define makes this fail, and the body is then parsed whole so that the request model names it."""

    hook: msgspec.Raw = UNSET
    hookInstance: msgspec.Raw = UNSET
    fhirServer: msgspec.Raw = UNSET
    fhirAuthorization: msgspec.Raw = UNSET
    context: msgspec.Raw = UNSET
    prefetch: dict[str, msgspec.Raw] | None = UNSET
    extension: msgspec.Raw = UNSET


class BundleSkeleton(msgspec.Struct, forbid_unknown_fields=True):
    """A Bundle's R4 elements, entries as raw items; anything else (a Patient, an OperationOutcome with an
    `issue`) fails here and is parsed whole."""

    resourceType: msgspec.Raw = UNSET
    id: msgspec.Raw = UNSET
    meta: msgspec.Raw = UNSET
    implicitRules: msgspec.Raw = UNSET
    language: msgspec.Raw = UNSET
    identifier: msgspec.Raw = UNSET
    type: msgspec.Raw = UNSET
    timestamp: msgspec.Raw = UNSET
    total: msgspec.Raw = UNSET
    link: msgspec.Raw = UNSET
    entry: list[msgspec.Raw] = UNSET
    signature: msgspec.Raw = UNSET


BUNDLE = msgspec.Raw(b'"Bundle"')  # as nearly every server writes it; any other spelling is parsed to compare
_ENVELOPE = msgspec.json.Decoder(Envelope)
_BUNDLE = msgspec.json.Decoder(BundleSkeleton)
_KIND = msgspec.json.Decoder(KindOnly)


class Heads:
    """The heads of one index plan's types, and the plan's decision on a head: does any clause of the
    plan's rules read this resource? The one implementation of that decision (IndexPlan.reads converts a
    whole resource to its head and asks here)."""

    __slots__ = ("_bundle", "_convert", "_entry", "_line", "_lines", "_raw_seen", "_resource", "_seen", "codes",
                 "elements", "texts", "types", "whole")

    def __init__(self, whole: frozenset[str], codes: dict[str, dict[str, tuple[tuple[str, int], ...]]],
                 texts: dict[str, tuple[Any, ...]]) -> None:
        self.whole, self.codes, self.texts = whole, codes, texts
        self.types: dict[type, str] = {}
        # line class -> type, head class, (decoder, default) of each raw element, their count
        self._lines: dict[type, tuple[str, type, tuple[tuple[Any, Any], ...], int]] = {}
        self._raw_seen: dict[tuple[type, tuple[bytes | None, ...]], bool] = {}  # (line class, raw elements) -> decision
        # head class -> (element, child element or None) of each code element
        self.elements: dict[type, tuple[tuple[str, str | None], ...]] = {}
        for kind in sorted(whole | set(codes) | set(texts)):
            fields: list[tuple[str, Any, Any]] = []
            paths: list[tuple[str, str | None]] = []
            if kind not in whole:
                for path in CODE_ELEMENTS.get(kind, ()):
                    name, _, child = path.partition(".")
                    if child:
                        nested = msgspec.defstruct(f"{kind}_{name}", [(child, Concepts, None)], frozen=True)
                        fields.append((name, nested | None, None))
                    else:
                        fields.append((name, Concepts, None))
                    paths.append((name, child or None))
                if kind in texts:
                    fields += [("note", tuple[NoteHead, ...] | None, None), ("valueString", Any, None)]
                if kind in MEDICATION_TYPES:
                    fields.append(("medicationReference", Any, UNSET))
            head = msgspec.defstruct(f"{kind}Head", fields, tag_field="resourceType", tag=kind, frozen=True)
            self.types[head] = kind
            self.elements[head] = tuple(paths)
            # the head's deciding elements undecoded and, after them, what population screening's split needs
            # (decode_line); an order's medicationReference, the last of its head, is one of those
            deciding = [field for field in fields if field[0] != "medicationReference"]
            line = msgspec.defstruct(f"{kind}Line", [(name, msgspec.Raw, UNSET) for name, _, _ in deciding] + [
                (n, Any, UNSET if n == "medicationReference" else None) for n in LINE_ELEMENTS],
                tag_field="resourceType", tag=kind)
            self._lines[line] = (kind, head, tuple((msgspec.json.Decoder(t), d) for _, t, d in deciding),
                                 len(deciding))
        resource = Union[tuple(self.types)]  # type: ignore[valid-type]  # noqa: UP007
        entry: Any = msgspec.defstruct("EntryHead", [("resource", resource | None, None)])
        self._entry: msgspec.json.Decoder[Any] = msgspec.json.Decoder(entry)
        bundle: Any = msgspec.defstruct("BundleHeads", [("entry", list[entry], [])])
        self._bundle: msgspec.json.Decoder[Any] = msgspec.json.Decoder(bundle)
        self._convert = entry
        self._resource: msgspec.json.Decoder[Any] = msgspec.json.Decoder(resource)
        self._line: msgspec.json.Decoder[Any] = msgspec.json.Decoder(Union[tuple(self._lines)])  # noqa: UP007
        self._seen: dict[Any, bool] = {}  # head -> decision

    def kept(self, bundle: msgspec.Raw, items: list[msgspec.Raw]) -> list[msgspec.Raw]:
        """The entries of a Bundle (its raw JSON, and its entries' raw JSON) that the plan reads. The
        heads of all entries are decoded in one call; a Bundle with an entry of a type no clause reads,
        or one not shaped as FHIR shapes it, is decided entry by entry."""
        try:
            entries = self._bundle.decode(bundle).entry
        except msgspec.ValidationError:
            return [item for item in items if self.reads_entry(item)]
        # the same bytes under two decoders: the same entries, in the same order
        return [item for item, entry in zip(items, entries, strict=True)
                if entry.resource is None or self.reads(entry.resource)]

    def reads_entry(self, item: bytes | msgspec.Raw) -> bool:
        """Whether a Bundle entry (its raw JSON) holds a resource the plan reads; an odd one is kept."""
        try:
            resource = self._entry.decode(item).resource
        except msgspec.ValidationError:  # a type no clause reads, or a head not shaped as FHIR shapes it
            try:
                kind = _KIND.decode(item).resource
            except msgspec.ValidationError:
                return True
            if kind is None:  # no resource: nothing to judge
                return True
            name = kind.resourceType  # a type that is read but a head that is not shaped as FHIR's: kept
            return isinstance(name, str) and (name in self.whole or name in self.codes or name in self.texts
                                              or name == "OperationOutcome")
        return resource is None or self.reads(resource)

    def reads_json(self, data: bytes, kind: str) -> bool:
        """The same decision on a resource's raw JSON whose type is already known (population screening's
        split of an export, where three lines in four are vital signs and labs no rule reads: they are
        never parsed into dicts). A head not shaped as FHIR shapes it is kept, as in reads_entry."""
        if not (kind in self.whole or kind in self.codes or kind in self.texts):
            return False
        try:
            head = self._resource.decode(data)
        except (msgspec.DecodeError, RecursionError):
            return True
        return self.reads(head)

    def decode_line(self, data: bytes) -> tuple[str, Any, bool] | None:
        """One NDJSON line of a type the plan reads, in one decode: its type, the line's head (LINE_ELEMENTS:
        the patient's references, the id, medicationReference) and the plan's decision; None for any other
        line (a type no clause reads, bad JSON, a head not shaped as FHIR shapes it), which the caller reads
        the slow way. Population screening's split decodes every line of an export, three in four of them
        vital signs and labs it leaves out, and the code elements that decide come as the same few bytes
        over and over: they are left as raw JSON, and decided once per distinct bytes."""
        try:
            line = self._line.decode(data)
        except (msgspec.DecodeError, RecursionError):  # deep nesting is a RecursionError to msgspec
            return None
        kind, head, elements, count = self._lines[type(line)]
        if line.medicationReference is not UNSET and kind in MEDICATION_TYPES:
            return kind, line, True  # its code is the Medication's (as _decide)
        key = (type(line), tuple([None if v is UNSET else bytes(v) for v in msgspec.structs.astuple(line)[:count]]))
        hit = self._raw_seen.get(key)
        if hit is None:
            try:
                decoded = [default if raw is None else decoder.decode(raw)
                           for raw, (decoder, default) in zip(key[1], elements, strict=True)]
            except msgspec.DecodeError:
                return None
            hit = self.reads(head(*decoded))
            if sum(len(raw) for raw in key[1] if raw is not None) <= RAW_LIMIT:  # a note's text would not repeat
                if len(self._raw_seen) >= SEEN_LIMIT:
                    self._raw_seen.clear()
                self._raw_seen[key] = hit
        return kind, line, hit

    def reads_resource(self, resource: dict[str, Any]) -> bool:
        """The same decision on a parsed resource (population screening)."""
        kind = resource.get("resourceType")
        if not isinstance(kind, str) or not (kind in self.whole or kind in self.codes or kind in self.texts):
            return False
        try:  # converted as an entry: msgspec caches how to build a struct type, not a bare union
            head = msgspec.convert({"resource": resource}, self._convert).resource
        except msgspec.ValidationError:  # not shaped as FHIR shapes it: the record copes, as on any call
            return True
        return self.reads(head)

    def reads(self, head: Any) -> bool:
        """Heads are frozen structs, equal when what the plan can see of two resources is equal: a record
        repeats the same few codes and displays ("Heart rate", "Hemoglobin A1c") hundreds of times, so
        each distinct head is decided once per rule load, not once per resource."""
        try:
            hit = self._seen.get(head)
        except TypeError:  # an unhashable value (a code sent as an object): decided every time
            return self._decide(head)
        if hit is None:
            hit = self._decide(head)
            if len(self._seen) >= SEEN_LIMIT:  # a bound, not an eviction policy: heads repeat
                self._seen.clear()
            self._seen[head] = hit
        return hit

    def _decide(self, head: Any) -> bool:
        kind = self.types[type(head)]
        if kind in self.whole:
            return True
        wanted, patterns = self.codes.get(kind), self.texts.get(kind)
        if getattr(head, "medicationReference", UNSET) is not UNSET:  # its code is the Medication's
            return True
        concepts: list[ConceptHead] = []
        for name, child in self.elements[type(head)]:
            value = getattr(head, name)
            if child is not None and value is not None:
                value = getattr(value, child)
            if value is not None:
                concepts.extend(value) if value.__class__ is tuple else concepts.append(value)
        try:
            if wanted is not None:
                for concept in concepts:
                    for coding in concept.coding or ():
                        targets = wanted.get(coding.code)
                        if targets is not None:
                            system = coding.system
                            system = SYSTEM_ALIASES.get(system, system) if isinstance(system, str) else system
                            if any(system == want for want, _ in targets):
                                return True
            if patterns is not None:
                texts = [c.text for c in concepts] + [d.display for c in concepts for d in c.coding or ()]
                texts += [n.text for n in head.note or ()]
                texts.append(head.valueString)
                return any(pattern.search(text) for text in texts if isinstance(text, str) for pattern in patterns)
        except TypeError:  # an unhashable code: keep it, the record copes as on any call
            return True
        return False


# What a line of an export holds besides its head that the split needs (fhir.patient_in reads the first four).
LINE_ELEMENTS = ("id", "subject", "patient", "beneficiary", "medicationReference")
SEEN_LIMIT = 50_000  # distinct heads a Heads remembers the decision on
RAW_LIMIT = 1_024  # bytes of raw elements above which a line's decision is not remembered (decode_line)


def parse_body(body: bytes, heads: Heads | None) -> dict[str, Any]:
    """The request body as a dict; with an index plan's heads (`IndexPlan.heads`), prefetch Bundles hold
    only the entries the plan reads.
    Malformed JSON is a 400, nesting beyond 1024 levels (orjson's limit) a 400 too-costly, as ever."""
    if not body:
        raise BadRequest("request body is empty; a JSON object is required")
    if heads is not None and is_utf8(body):  # else parsed whole: orjson's 400 says where
        try:
            envelope = _ENVELOPE.decode(body)
        except msgspec.ValidationError:  # not an object, or not shaped as a request: parsed whole below
            pass
        except (msgspec.DecodeError, RecursionError) as exc:
            _refuse(exc)
        else:
            parsed = {name: _loads(getattr(envelope, name)) for name in Envelope.__struct_fields__
                      if name != "prefetch" and getattr(envelope, name) is not UNSET}
            if envelope.prefetch is not UNSET:
                parsed["prefetch"] = None if envelope.prefetch is None else {
                    key: _value(value, heads) for key, value in envelope.prefetch.items()}
            return parsed
    value = _loads(body)
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


def _value(raw: msgspec.Raw, heads: Heads) -> Any:
    """One prefetch value: a Bundle with the entries the plan reads, anything else whole."""
    try:
        bundle = _BUNDLE.decode(raw)
    except msgspec.ValidationError:
        return _loads(raw)
    if not bundle.entry or bundle.resourceType is UNSET or (  # no entries (most keys): one parse is cheaper
            bundle.resourceType != BUNDLE and _loads(bundle.resourceType) != "Bundle"):
        return _loads(raw)
    parsed = {name: _loads(getattr(bundle, name)) for name in BundleSkeleton.__struct_fields__
              if name != "entry" and getattr(bundle, name) is not UNSET}
    parsed["entry"] = [_loads(item) for item in heads.kept(raw, bundle.entry)]
    return parsed


def is_utf8(*parts: bytes) -> bool:
    """Whether the bytes, taken one after another, are UTF-8: msgspec does not check the UTF-8 of what it
    skips, and orjson would have refused it. ASCII (nearly every body and export) is one quick scan;
    anything else is decoded a megabyte at a time, so a 64 MB chunk of an export never becomes a str."""
    if all(part.isascii() for part in parts):
        return True
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), _SLICE):
                decoder.decode(view[start:start + _SLICE])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


_SLICE = 1 << 20


def _loads(raw: bytes | msgspec.Raw) -> Any:
    try:
        return orjson.loads(raw if isinstance(raw, bytes) else memoryview(raw))
    except orjson.JSONDecodeError as exc:
        _refuse(exc)


def _refuse(exc: Exception) -> NoReturn:
    if isinstance(exc, RecursionError) or "depth" in str(exc) or "recursion" in str(exc):
        raise TooDeep("JSON nesting is too deep") from None
    raise BadRequest(f"malformed JSON: {exc}") from None
