//! `dps export` and `dps import`: enrollments and groups as JSON lines, one record per line as
//! the service API shows it (with its keys: the file is a secret), groups told apart by their
//! `enrollmentGroupId`. Import writes through the bulk API in "update" mode (create or
//! replace), so running it again is harmless; from a file it also keeps its place in
//! `FILE.import-progress` and, interrupted, continues from there.

use super::client::{CliError, Service};
use serde_json::{json, Value};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

/// Writes every enrollment, then every group, one JSON object per line; to `file` (mode 0600)
/// or stdout. Returns how many.
pub fn export(s: &Service, file: Option<PathBuf>) -> Result<u64, CliError> {
    let mut out: Box<dyn Write> = match &file {
        Some(p) => {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .map_err(|e| CliError::local(format!("cannot write {}: {e}", p.display())))?;
            Box::new(std::io::BufWriter::new(f))
        }
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut n = 0u64;
    for collection in ["/enrollments", "/enrollmentGroups"] {
        s.query_all(&format!("{collection}/query"), &json!({"query": "*"}), |v| {
            let v = super::with_keys(s, collection, v)?;
            writeln!(out, "{v}").map_err(|e| CliError::local(format!("writing: {e}")))?;
            n += 1;
            Ok(())
        })?;
    }
    out.flush().map_err(|e| CliError::local(format!("writing: {e}")))?;
    Ok(n)
}

#[derive(clap::Args, Debug, Clone)]
pub struct ImportOpts {
    /// JSON lines as `dps export` writes them (default: stdin).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Records per bulk call (the service's `limits.max_bulk_items`, 10 by default as in DPS).
    #[arg(long, default_value_t = 10)]
    pub batch: usize,
    /// Start from the first line, whatever FILE.import-progress says.
    #[arg(long)]
    pub restart: bool,
}

/// What an import did.
pub struct Imported {
    pub written: u64,
    pub skipped: u64,
    pub failed: Vec<String>,
}

/// Fields the service sets itself; a record is written without them.
const SERVER_FIELDS: &[&str] = &["etag", "createdDateTimeUtc", "lastUpdatedDateTimeUtc", "registrationState"];

pub fn import(s: &Service, o: &ImportOpts) -> Result<Imported, CliError> {
    let progress_file = o.file.as_ref().map(|f| PathBuf::from(format!("{}.import-progress", f.display())));
    let done_before: u64 = match (&progress_file, o.restart) {
        (Some(p), false) => std::fs::read_to_string(p).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0),
        _ => 0,
    };
    let reader: Box<dyn BufRead> = match &o.file {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).map_err(|e| CliError::local(format!("cannot read {}: {e}", p.display())))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin().lock())),
    };
    // The bar's length: the file's lines, counted (streaming) only when there is a bar to show.
    let total = match std::io::stderr().is_terminal() {
        true => o.file.as_deref().and_then(count_lines),
        false => None,
    };
    let bar = match total {
        Some(t) => {
            let b = indicatif::ProgressBar::new(t);
            b.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} records  {per_sec}  eta {eta}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_position(done_before);
            Some(b)
        }
        _ => None,
    };
    let mut result = Imported { written: 0, skipped: done_before, failed: Vec::new() };
    let (mut enrollments, mut groups) = (Vec::new(), Vec::new());
    let mut line_no = 0u64;
    let flush = |enrollments: &mut Vec<Value>, groups: &mut Vec<Value>, upto: u64, result: &mut Imported| -> Result<(), CliError> {
        for (path, key, records) in [("/enrollments", "enrollments", enrollments), ("/enrollmentGroups", "enrollmentGroups", groups)] {
            if records.is_empty() {
                continue;
            }
            let n = records.len() as u64;
            let (answer, _) = s.call("POST", path, Some(&json!({"mode": "update", key: std::mem::take(records)})), &[])?;
            for e in answer.get("errors").and_then(Value::as_array).cloned().unwrap_or_default() {
                result.failed.push(e.to_string());
            }
            result.written += n;
        }
        if let Some(p) = &progress_file {
            std::fs::write(p, upto.to_string()).map_err(|e| CliError::local(format!("cannot write {}: {e}", p.display())))?;
        }
        if let Some(b) = &bar {
            b.set_position(upto);
        }
        Ok(())
    };
    for line in reader.lines() {
        let line = line.map_err(|e| CliError::local(format!("reading: {e}")))?;
        line_no += 1;
        if line_no <= done_before || line.trim().is_empty() {
            continue;
        }
        let mut v: Value = serde_json::from_str(&line).map_err(|e| CliError::local(format!("line {line_no}: not a JSON record: {e}")))?;
        if let Some(m) = v.as_object_mut() {
            for f in SERVER_FIELDS {
                m.remove(*f);
            }
        }
        if v.get("enrollmentGroupId").is_some() {
            groups.push(v);
        } else if v.get("registrationId").is_some() {
            enrollments.push(v);
        } else {
            return Err(CliError::local(format!("line {line_no}: neither registrationId nor enrollmentGroupId")));
        }
        if enrollments.len() >= o.batch.max(1) || groups.len() >= o.batch.max(1) {
            flush(&mut enrollments, &mut groups, line_no, &mut result)?;
        }
    }
    flush(&mut enrollments, &mut groups, line_no, &mut result)?;
    if let Some(b) = bar {
        b.finish();
    }
    if let Some(p) = &progress_file {
        let _ = std::fs::remove_file(p);
    }
    Ok(result)
}

/// Newlines in a file, read in blocks (a big import is never held in memory for it).
fn count_lines(path: &std::path::Path) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut block = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        match f.read(&mut block) {
            Ok(0) => return Some(n),
            Ok(k) => n += block[..k].iter().filter(|c| **c == b'\n').count() as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lines_are_counted_across_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.jsonl");
        let line = format!("{{\"registrationId\":\"{}\"}}\n", "x".repeat(100));
        std::fs::write(&p, line.repeat(1500)).unwrap();
        assert_eq!(super::count_lines(&p), Some(1500));
        assert_eq!(super::count_lines(&dir.path().join("absent")), None);
    }
}
