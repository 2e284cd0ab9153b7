//! The key form both ways: a key's values as the edit form shows them, and a posted create or
//! edit form as key parameters (or the errors to show next to each field).

use serde_json::{json, Map, Value};

use super::Fields;
use crate::models::api_keys::{self, KeyParams};

/// A key's current values as the edit form shows them.
pub(super) fn key_form(k: &api_keys::Model) -> Value {
    let num = |v: Option<i64>| v.map(|n| n.to_string()).unwrap_or_default();
    let day = |t: Option<sea_orm::prelude::DateTimeWithTimeZone>| {
        t.map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default()
    };
    json!({
        "name": k.name,
        "email": k.email,
        "organization": k.organization.clone().unwrap_or_default(),
        "calls": num(k.max_calls),
        "prompt_tokens": num(k.prompt_token_limit),
        "gen_tokens": num(k.gen_token_limit),
        "priority": k.priority.to_string(),
        "valid_from": day(k.valid_from),
        "valid_until": day(k.valid_until),
    })
}

/// The create or edit form as key parameters, or the errors to show next to each field.
pub(super) fn key_params(fields: &Fields) -> Result<KeyParams, Map<String, Value>> {
    let mut errors = Map::new();
    let text = |name: &str| fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let mut number = |name: &str| -> Option<i64> {
        let raw = text(name)?;
        match raw.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => {
                errors.insert(name.into(), json!("A whole number, 0 or more."));
                None
            }
        }
    };
    let max_calls = number("calls");
    let prompt_token_limit = number("prompt_tokens");
    let gen_token_limit = number("gen_tokens");
    let priority = number("priority").unwrap_or(0);
    if priority > i64::from(api_keys::MAX_PRIORITY) {
        errors.insert(
            "priority".into(),
            json!(format!("0 to {}.", api_keys::MAX_PRIORITY)),
        );
    }
    let mut bound = |name: &str, end: bool| {
        text(name).and_then(|raw| match api_keys::parse_bound(raw, end) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.insert(name.into(), json!(e.to_string()));
                None
            }
        })
    };
    let valid_from = bound("valid_from", false);
    let valid_until = bound("valid_until", true);
    let email = text("email").unwrap_or_default().to_string();
    if !email.contains('@') {
        errors.insert("email".into(), json!("An email address is required."));
    }
    if let (Some(f), Some(u)) = (valid_from, valid_until) {
        if u < f {
            errors.insert(
                "valid_until".into(),
                json!("Must not be before “valid from”."),
            );
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(KeyParams {
        name: text("name").unwrap_or_default().to_string(),
        email,
        organization: text("organization").map(str::to_string),
        max_calls,
        valid_from,
        valid_until,
        prompt_token_limit,
        gen_token_limit,
        priority: i32::try_from(priority).unwrap_or(0),
        ..Default::default()
    })
}
