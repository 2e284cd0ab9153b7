//! Structured output: OpenAI's `response_format` (`json_object`, `json_schema`) as a GBNF
//! grammar that constrains decoding, so the answer always parses and, with a schema, validates.
//!
//! The grammar comes from llama.cpp's own converter (`json_schema_to_grammar`, the one
//! llama.cpp's server uses). That converter skips keywords it does not know and falls back to
//! "any string" for regular expressions it cannot translate; a client would then believe a
//! constraint was honoured when it was not. So [`constrain`] first walks the schema the way
//! the converter reads it and refuses, by path and name, every keyword whose constraint would
//! be lost (`format: "email"`, `multipleOf`, `uniqueItems`, bounds on a `number`, `$ref` to
//! another document, …). Keywords that only annotate (`title`, `description`, `default`, …)
//! and keywords about other types than the one generated (`maxLength` on an integer) change
//! nothing and are accepted.
//!
//! What is honoured: `type` (one or a list), `enum`, `const`, `anyOf`/`oneOf` (generated as
//! `anyOf`: one alternative is produced, which also satisfies `oneOf` unless alternatives
//! overlap), `allOf` of object schemas (merged), `$ref` into the same document (`#/$defs/…`),
//! objects (`properties`, `required`, `additionalProperties`; without `additionalProperties`
//! no other keys are generated), arrays (`items`, `prefixItems`, `minItems`, `maxItems`),
//! strings (`minLength`, `maxLength`, anchored `pattern`s the converter can translate,
//! `format` `date`, `time`, `date-time`, `uuid`), integers (`minimum`, `maximum`,
//! `exclusiveMinimum`, `exclusiveMaximum`), numbers, booleans and null.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// What the client asked the output to be, as admitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// A JSON value valid against `schema`.
    JsonSchema {
        name: String,
        schema: Value,
        #[serde(default)]
        strict: bool,
    },
}

/// A response format with the grammar that enforces it, built once at admission and carried
/// in the job, so the worker only compiles it for its vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputConstraint {
    /// As asked (kept for engines that forward it rather than decode themselves).
    pub format: ResponseFormat,
    /// GBNF, root rule `root`.
    pub grammar: String,
    /// Lazy grammar: decoding is free until the model writes one of these, then only what the
    /// grammar allows from that word on (tool calls with `tool_choice: "auto"`). Empty: the
    /// grammar holds from the first token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<String>,
}

/// Why a response format cannot be enforced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Valid JSON Schema whose constraints the grammar would drop (each named with its path).
    #[error("the grammar cannot enforce {}", .0.join("; "))]
    Unsupported(Vec<String>),
    /// Not a usable schema (wrong shapes, a `$ref` that resolves nowhere, a bad regex).
    #[error("{0}")]
    Invalid(String),
}

/// Most problems named in one refusal.
const MAX_NAMED: usize = 12;

/// Keywords that only annotate or hold definitions: no constraint is lost by skipping them.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "$anchor",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
];
const STRING_KEYWORDS: &[&str] = &[
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "contentEncoding",
    "contentMediaType",
    "contentSchema",
];
const NUMBER_KEYWORDS: &[&str] = &[
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];
const ARRAY_KEYWORDS: &[&str] = &[
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "unevaluatedItems",
    "additionalItems",
];
const OBJECT_KEYWORDS: &[&str] = &[
    "properties",
    "required",
    "additionalProperties",
    "patternProperties",
    "propertyNames",
    "minProperties",
    "maxProperties",
    "dependentRequired",
    "dependentSchemas",
    "unevaluatedProperties",
    "dependencies",
];
/// String formats the converter generates (anything else would be an unchecked string).
const FORMATS: &[&str] = &[
    "date",
    "time",
    "date-time",
    "uuid",
    "uuid1",
    "uuid2",
    "uuid3",
    "uuid4",
    "uuid5",
];

/// What the converter generates for a schema node (decided in its order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Object,
    AllOf,
    Array,
    String,
    Integer,
    Number,
    Boolean,
    Null,
    Any,
}

impl Kind {
    /// The keywords that constrain values of this kind (all typed keywords for `Any`).
    fn owns(self, keyword: &str) -> bool {
        match self {
            Self::Object | Self::AllOf => OBJECT_KEYWORDS.contains(&keyword),
            Self::Array => ARRAY_KEYWORDS.contains(&keyword),
            Self::String => STRING_KEYWORDS.contains(&keyword),
            Self::Integer | Self::Number => NUMBER_KEYWORDS.contains(&keyword),
            Self::Boolean | Self::Null => false,
            Self::Any => is_typed(keyword),
        }
    }
}

fn is_typed(keyword: &str) -> bool {
    [
        STRING_KEYWORDS,
        NUMBER_KEYWORDS,
        ARRAY_KEYWORDS,
        OBJECT_KEYWORDS,
    ]
    .iter()
    .any(|set| set.contains(&keyword))
}

/// The grammar for `format`, after checking that every constraint in it can be enforced.
///
/// # Errors
/// [`FormatError::Unsupported`] naming each keyword the grammar would drop;
/// [`FormatError::Invalid`] for a schema that is not usable at all.
pub fn constrain(format: ResponseFormat) -> Result<OutputConstraint, FormatError> {
    let schema = match &format {
        ResponseFormat::JsonObject => json!({"type": "object"}),
        ResponseFormat::JsonSchema { schema, .. } => {
            let mut walker = Walker::new(schema);
            walker.visit(schema, "#")?;
            if !walker.unsupported.is_empty() {
                walker.unsupported.truncate(MAX_NAMED);
                return Err(FormatError::Unsupported(walker.unsupported));
            }
            schema.clone()
        }
    };
    let grammar = convert(&schema)?;
    Ok(OutputConstraint {
        format,
        grammar,
        triggers: Vec::new(),
    })
}

/// llama.cpp's converter; its own messages stay inside it (the shim returns a status only).
fn convert(schema: &Value) -> Result<String, FormatError> {
    llama_cpp_2::json_schema_to_grammar(&schema.to_string()).map_err(|e| {
        FormatError::Invalid(format!(
            "llama.cpp's JSON-schema converter refused the schema ({e})"
        ))
    })
}

/// `schema` without the keywords the grammar cannot enforce, for a schema that is a hint
/// rather than a contract (a tool offered without `strict`, as OpenAI treats one): decoding
/// holds to the rest. What cannot be dropped keyword by keyword (a boolean schema, `oneOf`
/// beside `anyOf`, a `$ref` out of the schema) is still refused.
///
/// # Errors
/// [`FormatError::Unsupported`] naming what cannot be dropped; [`FormatError::Invalid`] as
/// [`constrain`].
pub fn relaxed(schema: &Value) -> Result<Value, FormatError> {
    let mut schema = schema.clone();
    loop {
        let (unsupported, undroppable, drops) = {
            let mut walker = Walker::new(&schema);
            walker.visit(&schema, "#")?;
            (walker.unsupported, walker.undroppable, walker.drops)
        };
        if unsupported.is_empty() {
            return Ok(schema);
        }
        if !undroppable.is_empty() {
            return Err(FormatError::Unsupported(
                undroppable.into_iter().take(MAX_NAMED).collect(),
            ));
        }
        // A keyword lost only beside another (`maxLength` beside `format`) may hold once that
        // one is gone: drop the others first, then look again.
        let first: Vec<_> = drops
            .iter()
            .filter(|(_, _, beside)| !beside)
            .cloned()
            .collect();
        let drops = if first.is_empty() { drops } else { first };
        let mut dropped = false;
        for (at, key, _) in drops {
            let pointer = at.strip_prefix('#').unwrap_or(&at);
            if let Some(Value::Object(o)) = schema.pointer_mut(pointer) {
                dropped |= o.remove(&key).is_some();
            }
        }
        // Keywords found at no place of the schema (under a list of types): not droppable.
        if !dropped {
            return Err(FormatError::Unsupported(
                unsupported.into_iter().take(MAX_NAMED).collect(),
            ));
        }
    }
}

/// Walks a schema as llama.cpp's `common_chat_schema_from_json` reads it.
struct Walker<'a> {
    root: &'a Value,
    unsupported: Vec<String>,
    /// Where each droppable one is: the object's path, the keyword, and whether it is lost only
    /// beside another keyword ([`relaxed`]).
    drops: Vec<(String, String, bool)>,
    /// The ones no keyword's removal would fix.
    undroppable: Vec<String>,
    /// `$ref`s already followed (schemas may be recursive).
    seen: HashSet<String>,
}

impl<'a> Walker<'a> {
    fn new(root: &'a Value) -> Self {
        Self {
            root,
            unsupported: Vec::new(),
            drops: Vec::new(),
            undroppable: Vec::new(),
            seen: HashSet::new(),
        }
    }

    /// A problem no single keyword's removal fixes.
    fn refuse(&mut self, what: String) {
        if !self.unsupported.contains(&what) {
            self.undroppable.push(what.clone());
            self.unsupported.push(what);
        }
    }

    /// Keyword `key` of the object at `at` cannot be enforced (`what` says why).
    fn refuse_key(&mut self, at: &str, key: &str, what: String) {
        if !self.unsupported.contains(&what) {
            let beside = what.contains("(ignored beside");
            self.unsupported.push(what);
            self.drops.push((at.to_string(), key.to_string(), beside));
        }
    }

    /// Keywords of `obj` other than `allowed` and annotations are refused as ignored beside
    /// `what`.
    fn only(&mut self, obj: &Map<String, Value>, path: &str, allowed: &[&str], what: &str) {
        for key in obj.keys() {
            if !allowed.contains(&key.as_str()) && !ANNOTATIONS.contains(&key.as_str()) {
                self.refuse_key(path, key, format!("{path}/{key} (ignored beside {what})"));
            }
        }
    }

    fn visit(&mut self, schema: &Value, path: &str) -> Result<Kind, FormatError> {
        let Some(obj) = schema.as_object() else {
            self.refuse(format!(
                "{path}: a boolean schema (write an object schema instead)"
            ));
            return Ok(Kind::Any);
        };
        if let Some(r) = obj.get("$ref") {
            self.only(obj, path, &["$ref"], "$ref");
            return self.visit_ref(r, path);
        }
        if obj.contains_key("oneOf") || obj.contains_key("anyOf") {
            if obj.contains_key("oneOf") && obj.contains_key("anyOf") {
                self.refuse(format!("{path}: oneOf together with anyOf"));
            }
            let key = if obj.contains_key("oneOf") {
                "oneOf"
            } else {
                "anyOf"
            };
            self.only(obj, path, &["oneOf", "anyOf"], key);
            for (i, alt) in schemas_of(&obj[key], &format!("{path}/{key}"))?
                .iter()
                .enumerate()
            {
                self.visit(alt, &format!("{path}/{key}/{i}"))?;
            }
            return Ok(Kind::Any);
        }
        let ty = obj.get("type").unwrap_or(&Value::Null);
        if let Some(types) = ty.as_array() {
            if types.is_empty() {
                return Err(FormatError::Invalid(format!(
                    "{path}/type must not be empty"
                )));
            }
            for (i, t) in types.iter().enumerate() {
                let mut alt = obj.clone();
                alt.insert("type".into(), t.clone());
                self.visit(&Value::Object(alt), &format!("{path}/type/{i}"))?;
            }
            return Ok(Kind::Any);
        }
        if obj.contains_key("const") {
            self.only(obj, path, &["const", "type"], "const");
            return Ok(Kind::Any);
        }
        if let Some(values) = obj.get("enum") {
            if values.as_array().is_none_or(Vec::is_empty) {
                return Err(FormatError::Invalid(format!(
                    "{path}/enum must be a non-empty array"
                )));
            }
            self.only(obj, path, &["enum", "type"], "enum");
            return Ok(Kind::Any);
        }
        let kind = kind_of(obj, ty, path)?;
        for key in obj.keys() {
            let k = key.as_str();
            if k == "type" || ANNOTATIONS.contains(&k) {
                continue;
            }
            if kind == Kind::AllOf && k == "allOf" {
                continue;
            }
            if !is_typed(k) {
                self.refuse_key(path, k, format!("{path}/{k}"));
            } else if kind.owns(k) {
                self.keyword(kind, obj, k, path)?;
            }
            // A keyword about another type than the one generated constrains nothing here.
        }
        if kind == Kind::AllOf {
            self.visit_all_of(obj, path)?;
        }
        Ok(kind)
    }

    fn visit_ref(&mut self, r: &Value, path: &str) -> Result<Kind, FormatError> {
        let Some(r) = r.as_str() else {
            return Err(FormatError::Invalid(format!(
                "{path}/$ref must be a string"
            )));
        };
        if !r.starts_with("#/") {
            self.refuse(format!(
                "{path}/$ref {r:?} (only references into the same schema, \"#/…\")"
            ));
            return Ok(Kind::Any);
        }
        let target = r[2..]
            .split('/')
            .try_fold(self.root, |node, sel| match node {
                Value::Object(o) => o.get(sel),
                Value::Array(a) => sel.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            })
            .ok_or_else(|| {
                FormatError::Invalid(format!("{path}/$ref {r:?} resolves to nothing"))
            })?;
        if !self.seen.insert(r.to_string()) {
            return Ok(Kind::Any);
        }
        self.visit(target, r)
    }

    fn visit_all_of(&mut self, obj: &Map<String, Value>, path: &str) -> Result<(), FormatError> {
        for (i, part) in schemas_of(&obj["allOf"], &format!("{path}/allOf"))?
            .iter()
            .enumerate()
        {
            let part_path = format!("{path}/allOf/{i}");
            let resolved = match part.get("$ref").and_then(Value::as_str) {
                Some(r) => r.strip_prefix("#/").and_then(|p| {
                    p.split('/')
                        .try_fold(self.root, |node, sel| node.as_object()?.get(sel))
                }),
                None => Some(part),
            };
            let kind = self.visit(part, &part_path)?;
            let object = resolved.and_then(Value::as_object).is_some_and(|o| {
                o.contains_key("properties") || o.get("type").is_some_and(|t| t == "object")
            });
            if !(object && matches!(kind, Kind::Object | Kind::Any)) {
                self.refuse(format!("{part_path} (allOf merges object schemas only)"));
            }
        }
        Ok(())
    }

    /// Checks one keyword the generated kind owns: honoured, or refused by name.
    fn keyword(
        &mut self,
        kind: Kind,
        obj: &Map<String, Value>,
        k: &str,
        path: &str,
    ) -> Result<(), FormatError> {
        let here = format!("{path}/{k}");
        let v = &obj[k];
        match (kind, k) {
            (Kind::Object, "properties") => {
                let Some(props) = v.as_object() else {
                    return Err(FormatError::Invalid(format!("{here} must be an object")));
                };
                for (name, prop) in props {
                    self.visit(prop, &format!("{here}/{name}"))?;
                }
            }
            (Kind::Object, "required") => {
                let props = obj.get("properties").and_then(Value::as_object);
                for name in v.as_array().into_iter().flatten().filter_map(Value::as_str) {
                    if !props.is_some_and(|p| p.contains_key(name)) {
                        self.refuse(format!(
                            "{here}: {name:?} (a required key needs a schema in properties)"
                        ));
                    }
                }
            }
            (Kind::Object, "additionalProperties") => match v {
                Value::Bool(_) => {}
                Value::Object(_) => {
                    self.visit(v, &here)?;
                }
                _ => {
                    return Err(FormatError::Invalid(format!(
                        "{here} must be a boolean or a schema"
                    )))
                }
            },
            (Kind::AllOf, "required" | "properties" | "additionalProperties") => {
                self.refuse_key(path, k, format!("{here} (ignored beside allOf)"));
            }
            (Kind::Array, "items" | "prefixItems") => {
                if k == "prefixItems" && obj.contains_key("items") {
                    self.refuse_key(path, k, format!("{here} (ignored beside items)"));
                    return Ok(());
                }
                match v {
                    Value::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            self.visit(item, &format!("{here}/{i}"))?;
                        }
                        for bound in ["minItems", "maxItems"] {
                            if obj.contains_key(bound) {
                                self.refuse_key(
                                    path,
                                    bound,
                                    format!("{path}/{bound} (ignored beside a list of {k})"),
                                );
                            }
                        }
                    }
                    _ => {
                        self.visit(v, &here)?;
                    }
                }
            }
            (Kind::Array, "minItems" | "maxItems") | (Kind::String, "minLength" | "maxLength") => {
                if v.as_u64().is_none_or(|n| n > i32::MAX as u64) {
                    return Err(FormatError::Invalid(format!(
                        "{here} must be a non-negative integer"
                    )));
                }
                if k.ends_with("Length")
                    && (obj.contains_key("pattern") || obj.contains_key("format"))
                {
                    self.refuse_key(
                        path,
                        k,
                        format!("{here} (ignored beside pattern or format)"),
                    );
                }
            }
            (Kind::String, "format") => match v.as_str() {
                Some(f) if FORMATS.contains(&f) => {
                    if obj.contains_key("pattern") {
                        self.refuse_key(path, k, format!("{here} (ignored beside pattern)"));
                    }
                }
                Some(f) => self.refuse_key(
                    path,
                    k,
                    format!(
                        "{here} {f:?} (supported formats: {})",
                        FORMATS[..4].join(", ")
                    ),
                ),
                None => return Err(FormatError::Invalid(format!("{here} must be a string"))),
            },
            (Kind::String, "pattern") => {
                let Some(p) = v.as_str() else {
                    return Err(FormatError::Invalid(format!("{here} must be a string")));
                };
                let alone = convert(&json!({"type": "string", "pattern": p})).map_err(|_| {
                    FormatError::Invalid(format!("{here} {p:?} is not a valid regular expression"))
                })?;
                // The converter falls back to the plain `string` rule for what it cannot
                // translate (unanchored patterns, lookarounds, some escapes).
                if alone.lines().any(|l| l.starts_with("string ::=")) {
                    self.refuse_key(path, k, format!(
                        "{here} {p:?} (only patterns anchored with ^ and $, in the regex subset llama.cpp translates)"
                    ));
                }
            }
            (Kind::Integer, "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum") => {
                if !v.is_number() {
                    return Err(FormatError::Invalid(format!("{here} must be a number")));
                }
                let inclusive = if k.starts_with("exclusiveMin") {
                    "minimum"
                } else if k.starts_with("exclusiveMax") {
                    "maximum"
                } else {
                    ""
                };
                if !inclusive.is_empty() && obj.contains_key(inclusive) {
                    self.refuse_key(path, k, format!("{here} (ignored beside {inclusive})"));
                }
            }
            (Kind::Number, _) => {
                self.refuse_key(path, k, format!("{here} (bounds apply to integers only)"));
            }
            _ => self.refuse_key(path, k, here),
        }
        Ok(())
    }
}

/// What the converter generates for a node with no `$ref`, `anyOf`, type list, `const` or
/// `enum`, in its own order.
fn kind_of(obj: &Map<String, Value>, ty: &Value, path: &str) -> Result<Kind, FormatError> {
    let has_properties = obj.contains_key("properties")
        || obj
            .get("additionalProperties")
            .is_some_and(|a| a != &Value::Bool(true));
    let name = match ty {
        Value::Null => "",
        Value::String(s) => s.as_str(),
        _ => {
            return Err(FormatError::Invalid(format!(
                "{path}/type must be a string or a list of strings"
            )))
        }
    };
    Ok(match name {
        "" if has_properties => Kind::Object,
        "" if obj.contains_key("allOf") => Kind::AllOf,
        "" if obj.contains_key("items") || obj.contains_key("prefixItems") => Kind::Array,
        "" if ["pattern", "minLength", "maxLength"]
            .iter()
            .any(|k| obj.contains_key(*k))
            || obj
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| FORMATS.contains(&f)) =>
        {
            Kind::String
        }
        "" => Kind::Any,
        "object" if !has_properties && obj.contains_key("allOf") => Kind::AllOf,
        "object" => Kind::Object,
        // The converter would merge a string's allOf as objects: refused through `allOf`.
        "string" => Kind::String,
        "array" => Kind::Array,
        "integer" => Kind::Integer,
        "number" => Kind::Number,
        "boolean" => Kind::Boolean,
        "null" => Kind::Null,
        other => {
            return Err(FormatError::Invalid(format!(
                "{path}/type {other:?} is not a JSON Schema type"
            )))
        }
    })
}

/// A non-empty list of schemas.
fn schemas_of<'v>(v: &'v Value, path: &str) -> Result<&'v Vec<Value>, FormatError> {
    v.as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| FormatError::Invalid(format!("{path} must be a non-empty list of schemas")))
}

/// A small value satisfying `constraint`, for the scripted stand-in engine (no model): the
/// required keys only, lower bounds, first alternatives. `pattern`s are not followed.
#[must_use]
pub fn example(constraint: &OutputConstraint) -> Value {
    match &constraint.format {
        ResponseFormat::JsonObject => json!({}),
        ResponseFormat::JsonSchema { schema, .. } => instance(schema, schema, 0),
    }
}

fn instance(schema: &Value, root: &Value, depth: usize) -> Value {
    let Some(obj) = schema.as_object().filter(|_| depth < 16) else {
        return Value::Null;
    };
    let deeper = |s: &Value| instance(s, root, depth + 1);
    if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
        let target = r.strip_prefix("#/").and_then(|p| {
            p.split('/')
                .try_fold(root, |node, sel| node.as_object()?.get(sel))
        });
        return target.map_or(Value::Null, deeper);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(first) = obj.get(key).and_then(|a| a.get(0)) {
            return deeper(first);
        }
    }
    if let Some(first) = obj.get("type").and_then(|t| t.get(0)) {
        let mut alt = obj.clone();
        alt.insert("type".into(), first.clone());
        return instance(&Value::Object(alt), root, depth + 1);
    }
    if let Some(c) = obj.get("const") {
        return c.clone();
    }
    if let Some(first) = obj.get("enum").and_then(|e| e.get(0)) {
        return first.clone();
    }
    if let Some(parts) = obj.get("allOf").and_then(Value::as_array) {
        let mut merged = Map::new();
        for part in parts {
            if let Value::Object(o) = deeper(part) {
                merged.extend(o);
            }
        }
        return Value::Object(merged);
    }
    let ty = obj.get("type").and_then(Value::as_str).unwrap_or_else(|| {
        if obj.contains_key("properties") {
            "object"
        } else if obj.contains_key("items") || obj.contains_key("prefixItems") {
            "array"
        } else if obj.contains_key("format") || obj.contains_key("minLength") {
            "string"
        } else {
            "null"
        }
    });
    let count = |k: &str| obj.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
    match ty {
        "object" => {
            let props = obj.get("properties").and_then(Value::as_object);
            let required = obj.get("required").and_then(Value::as_array);
            let mut out = Map::new();
            for name in required.into_iter().flatten().filter_map(Value::as_str) {
                if let Some(p) = props.and_then(|p| p.get(name)) {
                    out.insert(name.to_string(), deeper(p));
                }
            }
            Value::Object(out)
        }
        "array" => match obj.get("items").or_else(|| obj.get("prefixItems")) {
            Some(Value::Array(items)) => Value::Array(items.iter().map(deeper).collect()),
            Some(item) => Value::Array(vec![deeper(item); count("minItems")]),
            None => Value::Array(vec![Value::Null; count("minItems")]),
        },
        "string" => json!(match obj.get("format").and_then(Value::as_str) {
            Some("date") => "2026-01-01".to_string(),
            Some("time") => "00:00:00Z".to_string(),
            Some("date-time") => "2026-01-01T00:00:00Z".to_string(),
            Some(f) if f.starts_with("uuid") => "00000000-0000-4000-8000-000000000000".to_string(),
            _ => "a".repeat(count("minLength")),
        }),
        "integer" => {
            let lower = obj
                .get("minimum")
                .and_then(Value::as_f64)
                .map(f64::ceil)
                .or_else(|| {
                    obj.get("exclusiveMinimum")
                        .and_then(Value::as_f64)
                        .map(|m| m.floor() + 1.0)
                });
            let upper = obj
                .get("maximum")
                .and_then(Value::as_f64)
                .map(f64::floor)
                .or_else(|| {
                    obj.get("exclusiveMaximum")
                        .and_then(Value::as_f64)
                        .map(|m| m.ceil() - 1.0)
                });
            let n = match (lower, upper) {
                (Some(l), _) => l,
                (None, Some(u)) if u < 0.0 => u,
                _ => 0.0,
            };
            json!(n as i64)
        }
        "number" => json!(0),
        "boolean" => json!(false),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(s: Value) -> Result<OutputConstraint, FormatError> {
        constrain(ResponseFormat::JsonSchema {
            name: "t".into(),
            schema: s,
            strict: true,
        })
    }

    fn refused(s: Value) -> String {
        match schema(s) {
            Err(FormatError::Unsupported(named)) => named.join("; "),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_typical_strict_schema_becomes_a_grammar() {
        let c = schema(json!({
            "title": "Person",
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20, "description": "full name"},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "born": {"type": "string", "format": "date"},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                "pet": {"anyOf": [{"$ref": "#/$defs/pet"}, {"type": "null"}], "default": null},
                "code": {"type": "string", "pattern": "^[A-Z]{3}$"}
            },
            "required": ["name", "age", "born", "tags", "pet", "code"],
            "additionalProperties": false,
            "$defs": {"pet": {"type": "object", "properties": {"kind": {"const": "cat"}}}}
        }))
        .expect("supported");
        assert!(c.grammar.contains("root ::="), "{}", c.grammar);
        let example = example(&c);
        assert_eq!(example["age"], 0);
        assert_eq!(example["born"], "2026-01-01");
    }

    #[test]
    fn json_object_is_any_object() {
        let c = constrain(ResponseFormat::JsonObject).expect("grammar");
        assert!(c.grammar.contains("root ::="));
        assert_eq!(example(&c), json!({}));
    }

    #[test]
    fn constraints_the_grammar_would_drop_are_named() {
        let named = refused(json!({
            "type": "object",
            "properties": {
                "mail": {"type": "string", "format": "email"},
                "score": {"type": "number", "minimum": 0},
                "ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": true},
                "n": {"type": "integer", "multipleOf": 2},
                "x": {"not": {"type": "null"}},
                "free": {"type": "string", "pattern": "abc"}
            },
            "required": ["mail", "missing"]
        }));
        for part in [
            "#/properties/mail/format \"email\"",
            "#/properties/score/minimum",
            "#/properties/ids/uniqueItems",
            "#/properties/n/multipleOf",
            "#/properties/x/not",
            "#/properties/free/pattern",
            "\"missing\"",
        ] {
            assert!(named.contains(part), "{part} in {named}");
        }
    }

    #[test]
    fn remote_refs_and_siblings_of_ref_are_refused_and_dangling_refs_are_invalid() {
        assert!(refused(json!({"$ref": "https://example.com/s.json"})).contains("$ref"));
        assert!(
            refused(json!({"$ref": "#/$defs/a", "minimum": 1, "$defs": {"a": {}}}))
                .contains("#/minimum (ignored beside $ref)")
        );
        assert!(matches!(
            schema(json!({"$ref": "#/$defs/none"})),
            Err(FormatError::Invalid(_))
        ));
        assert!(refused(json!({"type": "object", "nullable": true})).contains("#/nullable"));
    }

    #[test]
    fn keywords_about_other_types_constrain_nothing_and_pass() {
        schema(json!({"type": ["string", "null"], "maxLength": 5})).expect("maxLength on null");
        schema(json!({"type": "integer", "maxLength": 5})).expect("vacuous");
        assert!(refused(json!({"minimum": 1})).contains("#/minimum"));
    }
}
