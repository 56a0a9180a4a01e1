//! What the CLI prints: JSON (the service's own shapes) or a table for people; keys hidden
//! unless asked for.

use serde_json::Value;
use std::io::{IsTerminal, Write};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Table,
}

/// What the CLI prints and how: `--output`, JSON by default when stdout is not a terminal.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OutputOpts {
    /// json or table (default: table on a terminal, JSON otherwise).
    #[arg(long, short = 'o', global = true)]
    pub output: Option<Format>,
    /// Show symmetric keys instead of hiding them.
    #[arg(long, global = true)]
    pub show_keys: bool,
}

impl OutputOpts {
    pub fn format(&self) -> Format {
        self.output.unwrap_or(if std::io::stdout().is_terminal() { Format::Table } else { Format::Json })
    }
}

/// The columns a table shows for each kind of record (JSON pointer, heading).
pub enum Kind {
    Enrollment,
    Group,
    Registration,
    Hub,
    Certificate,
    Other,
}

impl Kind {
    fn columns(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            Kind::Enrollment => &[
                ("/registrationId", "REGISTRATION ID"),
                ("/attestation/type", "ATTESTATION"),
                ("/provisioningStatus", "STATUS"),
                ("/allocationPolicy", "ALLOCATION"),
                ("/etag", "ETAG"),
            ],
            Kind::Group => &[
                ("/enrollmentGroupId", "ENROLLMENT ID"),
                ("/attestation/type", "ATTESTATION"),
                ("/provisioningStatus", "STATUS"),
                ("/allocationPolicy", "ALLOCATION"),
                ("/etag", "ETAG"),
            ],
            Kind::Registration => &[
                ("/registrationId", "REGISTRATION ID"),
                ("/status", "STATUS"),
                ("/assignedHub", "HUB"),
                ("/deviceId", "DEVICE ID"),
                ("/errorCode", "ERROR"),
            ],
            Kind::Hub => {
                &[("/name", "HOST NAME"), ("/kind", "KIND"), ("/allocationWeight", "WEIGHT"), ("/applyAllocationPolicy", "ALLOCATE")]
            }
            Kind::Certificate => &[
                ("/name", "NAME"),
                ("/properties/subject", "SUBJECT"),
                ("/properties/isVerified", "VERIFIED"),
                ("/properties/expiry", "EXPIRES"),
                ("/properties/verificationCode", "VERIFICATION CODE"),
            ],
            Kind::Other => &[],
        }
    }
}

/// Replaces symmetric keys (enrollments, groups) and connection strings (hubs) with a note.
pub fn hide_keys(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if matches!(k.as_str(), "primaryKey" | "secondaryKey" | "connectionString") && x.is_string() {
                    *x = Value::String("<hidden: --show-keys>".into());
                } else {
                    hide_keys(x);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(hide_keys),
        _ => {}
    }
}

fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
    }
}

/// Prints one record or a list.
pub fn print(mut v: Value, kind: Kind, o: &OutputOpts) {
    if !o.show_keys {
        hide_keys(&mut v);
    }
    let mut out = std::io::stdout().lock();
    let text = match o.format() {
        Format::Json => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Format::Table => table(&v, &kind),
    };
    let _ = writeln!(out, "{text}");
}

fn table(v: &Value, kind: &Kind) -> String {
    match (v, kind.columns()) {
        (Value::Array(rows), cols) if !cols.is_empty() => {
            let grid: Vec<Vec<String>> = std::iter::once(cols.iter().map(|(_, h)| h.to_string()).collect())
                .chain(rows.iter().map(|r| cols.iter().map(|(p, _)| cell(r.pointer(p))).collect()))
                .collect();
            let widths: Vec<usize> = (0..cols.len()).map(|i| grid.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
            grid.iter()
                .map(|r| r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string())
                .collect::<Vec<_>>()
                .join("\n")
        }
        (Value::Object(m), _) => {
            let w = m.keys().map(|k| k.len()).max().unwrap_or(0);
            m.iter().map(|(k, x)| format!("{k:<w$}  {}", cell(Some(x)))).collect::<Vec<_>>().join("\n")
        }
        (other, _) => cell(Some(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_hidden_and_tables_aligned() {
        let mut v = json!([{"registrationId": "a", "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "k1"}}, "etag": "e"},
                           {"registrationId": "longer-id", "attestation": {"type": "tpm"}, "provisioningStatus": "disabled"}]);
        hide_keys(&mut v);
        assert!(!v.to_string().contains("k1"));
        let t = table(&v, &Kind::Enrollment);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("REGISTRATION ID  ATTESTATION"), "{t}");
        assert!(lines[2].starts_with("longer-id        tpm"), "{t}");
    }
}
