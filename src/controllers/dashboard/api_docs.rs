//! The API page: the OpenAPI document ([`crate::openapi`]) as people read it — every operation
//! by family with who may call it, its parameters, body and answers, then every schema with its
//! fields. Rendered here from the document itself, so the page and `/openapi.json` never differ;
//! no Swagger UI, nothing loaded from outside.

use axum::http::StatusCode;
use loco_rs::controller::views::{engines::TeraView, ViewEngine};
use serde_json::{json, Map, Value};

use super::{render, PageResult, SignedIn};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

pub(super) async fn page(admin: SignedIn, ViewEngine(v): ViewEngine<TeraView>) -> PageResult {
    let doc = serde_json::to_value(crate::openapi::document()).unwrap_or_default();
    render(
        &v,
        StatusCode::OK,
        "dashboard/api.html",
        &admin.page(view(&doc)),
    )
}

/// What the template shows, read from the document's JSON.
fn view(doc: &Value) -> Value {
    let mut families: Vec<Value> = doc["tags"]
        .as_array()
        .map(|tags| {
            tags.iter()
                .map(|t| json!({"tag": t["name"], "about": words(&t["description"]), "operations": []}))
                .collect()
        })
        .unwrap_or_default();
    let empty = Map::new();
    for (path, item) in doc["paths"].as_object().unwrap_or(&empty) {
        for method in METHODS {
            let op = &item[method];
            if op.is_null() {
                continue;
            }
            let tag = op["tags"][0].as_str().unwrap_or_default();
            let Some(family) = families.iter_mut().find(|f| f["tag"] == tag) else {
                continue;
            };
            if let Some(ops) = family["operations"].as_array_mut() {
                ops.push(operation(method, path, op));
            }
        }
    }
    let schemas: Vec<Value> = doc["components"]["schemas"]
        .as_object()
        .unwrap_or(&empty)
        .iter()
        .map(|(name, s)| schema(name, s))
        .collect();
    json!({
        "title": doc["info"]["title"],
        "version": doc["info"]["version"],
        "openapi": doc["openapi"],
        "description": words(&doc["info"]["description"]),
        "families": families,
        "schemas": schemas,
    })
}

/// A text of the document, or nothing (the template shows no `null`).
fn words(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn operation(method: &str, path: &str, op: &Value) -> Value {
    let params: Vec<Value> = op["parameters"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    json!({
                        "name": p["name"],
                        "in": p["in"],
                        "required": p["required"].as_bool().unwrap_or(false),
                        "type": type_of(&p["schema"]),
                        "description": words(&p["description"]),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let body = op["requestBody"]["content"].as_object();
    let body_media_types = body.map_or_else(String::new, |c| {
        c.keys().cloned().collect::<Vec<_>>().join(", ")
    });
    let body_type = body
        .and_then(|c| c.values().next())
        .map_or_else(Vec::new, |c| type_of(&c["schema"]));
    let responses: Vec<Value> = op["responses"]
        .as_object()
        .map(|rs| {
            rs.iter()
                .map(|(status, r)| {
                    let bodies: Vec<Value> = r["content"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(media_type, c)| {
                            json!({"media_type": media_type, "type": type_of(&c["schema"])})
                        })
                        .collect();
                    json!({
                        "status": status,
                        "description": words(&r["description"]),
                        "bodies": bodies,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "id": op["operationId"],
        "method": method.to_uppercase(),
        "path": path,
        "summary": words(&op["summary"]),
        "description": words(&op["description"]),
        "access": words(&op[crate::openapi::ACCESS_EXTENSION]),
        "params": params,
        "body_media_types": body_media_types,
        "body_type": body_type,
        "responses": responses,
    })
}

fn schema(name: &str, s: &Value) -> Value {
    let mut fields = Vec::new();
    let mut includes = Vec::new();
    let mut one_of = Vec::new();
    collect_fields(s, &mut fields, &mut includes);
    for alternative in s["oneOf"].as_array().into_iter().flatten() {
        one_of.push(type_of(alternative));
    }
    json!({
        "name": name,
        "description": words(&s["description"]),
        "type": if fields.is_empty() && includes.is_empty() && one_of.is_empty() { type_of(s) } else { Vec::new() },
        "fields": fields,
        "includes": includes,
        "one_of": one_of,
    })
}

/// The fields of an object schema, and the schemas an `allOf` includes (flattened structs).
fn collect_fields(s: &Value, fields: &mut Vec<Value>, includes: &mut Vec<Vec<Value>>) {
    for part in s["allOf"].as_array().into_iter().flatten() {
        if part.get("$ref").is_some() {
            includes.push(type_of(part));
        } else {
            collect_fields(part, fields, includes);
        }
    }
    let required: Vec<&str> = s["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (field, f) in s["properties"].as_object().into_iter().flatten() {
        fields.push(json!({
            "name": field,
            "required": required.contains(&field.as_str()),
            "type": type_of(f),
            "description": words(&f["description"]),
        }));
    }
}

/// A schema's type as words and links: `[{"text": "array of "}, {"text": "Job", "ref": "Job"}]`.
fn type_of(s: &Value) -> Vec<Value> {
    let mut parts = Vec::new();
    describe(s, &mut parts);
    parts
}

fn text(parts: &mut Vec<Value>, t: impl Into<String>) {
    parts.push(json!({"text": t.into()}));
}

fn describe(s: &Value, parts: &mut Vec<Value>) {
    if let Some(r) = s["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r);
        parts.push(json!({"text": name, "ref": name}));
        return;
    }
    for (key, sep) in [("oneOf", " | "), ("anyOf", " | "), ("allOf", " + ")] {
        if let Some(alts) = s[key].as_array() {
            for (i, alt) in alts.iter().enumerate() {
                if i > 0 {
                    text(parts, sep);
                }
                describe(alt, parts);
            }
            return;
        }
    }
    let types: Vec<&str> = match &s["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if types.is_empty() {
        text(parts, "any");
        return;
    }
    for (i, t) in types.iter().enumerate() {
        if i > 0 {
            text(parts, " | ");
        }
        match *t {
            "array" => {
                text(parts, "array of ");
                describe(&s["items"], parts);
            }
            "object" if s["additionalProperties"].is_object() => {
                text(parts, "map of ");
                describe(&s["additionalProperties"], parts);
            }
            other => {
                let mut word = other.to_string();
                if let Some(f) = s["format"].as_str() {
                    word = format!("{word} ({f})");
                }
                text(parts, word);
            }
        }
    }
    if let Some(values) = s["enum"].as_array() {
        let names: Vec<String> = values
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect();
        text(parts, format!(": one of {}", names.join(", ")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_and_schema_of_the_document_is_on_the_page() {
        let doc = serde_json::to_value(crate::openapi::document()).expect("document");
        let page = view(&doc);
        let shown: usize = page["families"]
            .as_array()
            .expect("families")
            .iter()
            .map(|f| f["operations"].as_array().map_or(0, Vec::len))
            .sum();
        let documented: usize = doc["paths"]
            .as_object()
            .expect("paths")
            .values()
            .map(|item| METHODS.iter().filter(|m| !item[**m].is_null()).count())
            .sum();
        assert_eq!(shown, documented, "operations left off the page");
        assert_eq!(
            page["schemas"].as_array().map(Vec::len),
            doc["components"]["schemas"].as_object().map(Map::len)
        );
    }

    #[test]
    fn types_read_as_words_with_links_to_their_schemas() {
        let read = |s: Value| -> String {
            type_of(&s)
                .iter()
                .map(|p| p["text"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        assert_eq!(
            read(json!({"type": ["array", "null"], "items": {"$ref": "#/components/schemas/Job"}})),
            "array of Job | null"
        );
        assert_eq!(
            read(json!({"type": "string", "format": "date"})),
            "string (date)"
        );
        assert_eq!(
            type_of(&json!({"$ref": "#/components/schemas/Job"}))[0]["ref"],
            "Job"
        );
    }
}
