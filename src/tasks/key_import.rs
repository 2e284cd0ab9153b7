//! `cargo loco task key:import file=keys.csv` (or `file=-` for standard input): brings keys
//! issued by djangollmapi (seed 003) over, so its clients keep their key. Only each secret's
//! hash is stored; nothing printed shows a secret.
//!
//! One key per line, comma-separated. With a header line, columns are found by name —
//! djangollmapi's `ApiKey` fields: `key`, `email`, `first_name`, `last_name`, `organization`,
//! `n_allowed_requests`, `n_requests`, `start_date`, `end_date` (others are ignored). Without
//! one, the columns are `key,email,organization,n_allowed_requests,n_requests,start_date,end_date`
//! (trailing ones may be left out). Empty fields mean unlimited / open. The whole file is read
//! and checked before anything is stored; a file with any bad line stores nothing.

use std::io::Read;

use loco_rs::{
    app::AppContext,
    task::{Task, TaskInfo, Vars},
    Result,
};
use sea_orm::TransactionTrait;

use super::{migrated, model_err};
use crate::models::api_keys::{self, KeyParams};

pub struct KeyImport;

const POSITIONAL: [&str; 7] = [
    "key",
    "email",
    "organization",
    "n_allowed_requests",
    "n_requests",
    "start_date",
    "end_date",
];

/// One key to import, parsed.
#[derive(Debug)]
struct Row {
    secret: String,
    params: KeyParams,
    calls_used: i64,
}

fn fail(line: usize, message: impl std::fmt::Display) -> loco_rs::Error {
    loco_rs::Error::Message(format!("line {line}: {message}"))
}

/// Parses the file: every line checked, nothing stored.
fn parse(text: &str) -> Result<Vec<Row>> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .peekable();
    let columns: Vec<String> = match lines.peek() {
        Some((_, first)) if first.split(',').any(|c| c.trim() == "key") => {
            let header = first.split(',').map(|c| c.trim().to_string()).collect();
            lines.next();
            header
        }
        _ => POSITIONAL.iter().map(|c| (*c).to_string()).collect(),
    };
    let mut rows = Vec::new();
    for (n, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let get = |name: &str| {
            columns
                .iter()
                .position(|c| c == name)
                .and_then(|i| fields.get(i).copied())
                .filter(|v| !v.is_empty())
        };
        let whole = |name: &str| -> Result<Option<i64>> {
            get(name)
                .map(|v| {
                    v.parse::<i64>()
                        .map_err(|_| fail(n, format!("{name} must be a whole number, got {v:?}")))
                })
                .transpose()
        };
        let date = |name: &str, end: bool| -> Result<_> {
            get(name)
                .map(|v| api_keys::parse_bound(v, end).map_err(|e| fail(n, e)))
                .transpose()
        };
        let secret = get("key").ok_or_else(|| fail(n, "no key"))?.to_string();
        let email = get("email").ok_or_else(|| fail(n, "no email"))?.to_string();
        let name = [get("first_name"), get("last_name")]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        rows.push(Row {
            secret,
            calls_used: whole("n_requests")?.unwrap_or(0),
            params: KeyParams {
                name,
                email,
                organization: get("organization").map(str::to_string),
                max_calls: whole("n_allowed_requests")?,
                valid_from: date("start_date", false)?,
                valid_until: date("end_date", true)?,
                ..KeyParams::default()
            },
        });
    }
    Ok(rows)
}

#[async_trait::async_trait]
impl Task for KeyImport {
    fn task(&self) -> TaskInfo {
        TaskInfo {
            name: "key:import".into(),
            detail: "import existing plaintext keys (djangollmapi's) from file=PATH or file=- (stdin), one per line: key,email[,organization,n_allowed_requests,n_requests,start_date,end_date] or with a header naming the columns; stores only their hashes".into(),
        }
    }

    async fn run(&self, ctx: &AppContext, vars: &Vars) -> Result<()> {
        migrated(ctx).await?;
        let file = vars.cli_arg("file")?;
        let mut text = String::new();
        if file == "-" {
            std::io::stdin().read_to_string(&mut text)?;
        } else {
            text = std::fs::read_to_string(file)
                .map_err(|e| loco_rs::Error::Message(format!("{file}: {e}")))?;
        }
        let rows = parse(&text)?;
        let txn = ctx.db.begin().await?;
        let mut prefixes = Vec::new();
        for (i, row) in rows.into_iter().enumerate() {
            let key = api_keys::ActiveModel::import(&txn, row.params, &row.secret, row.calls_used)
                .await
                .map_err(|e| loco_rs::Error::Message(format!("key {}: {}", i + 1, model_err(e))))?;
            prefixes.push(format!("{} ({})", key.prefix, key.email));
        }
        txn.commit().await?;
        println!("imported {} keys: {}", prefixes.len(), prefixes.join(", "));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn positional_and_header_forms_parse_and_a_bad_line_fails_the_file() {
        let rows = parse(
            "66cc3a57c348b6b4947bac1a05916a1dcec060c3,a@example.com,ACME,100,7,2024-01-01,2030-12-31\n",
        )
        .expect("positional");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].calls_used, 7);
        assert_eq!(rows[0].params.max_calls, Some(100));
        assert!(rows[0].params.valid_from.is_some() && rows[0].params.valid_until.is_some());

        let rows = parse(
            "email,key,first_name,last_name,n_allowed_requests\n\
             b@example.com,0123456789abcdef0123456789abcdef01234567,Ada,Lovelace,\n",
        )
        .expect("header");
        assert_eq!(rows[0].params.name, "Ada Lovelace");
        assert_eq!(rows[0].params.max_calls, None, "empty means unlimited");
        assert_eq!(rows[0].secret, "0123456789abcdef0123456789abcdef01234567");

        let err = parse("k1234567890123456,c@example.com,,lots\n").expect_err("bad number");
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
