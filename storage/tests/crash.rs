#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns
//! Kills a writer process with SIGKILL in the middle of a stream of writes and checks that every
//! acknowledged write is present and intact after restart, and that every transaction (two
//! puts and the index entry the store adds) is there whole or not at all. A second test
//! watches the writer's system calls: no write is acknowledged before the journal holding it
//! was synced to disk (the first test alone would also pass with writes left in the page cache).

use dps_storage::{by_group_key, DataKey, FjallStore, Store, Table};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn acknowledged_writes_survive_sigkill() {
    for round in 0..3 {
        let d = tempfile::tempdir().unwrap();
        // The last round commits on the caller's thread (`inline_commit_max_us`).
        let mode = if round == 2 { "inline" } else { "group" };
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_writer")).arg(d.path()).arg(mode).stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut acked: Option<u64> = None;
        // Inline commits come 10 ms apart (crash_writer): fewer of them.
        let kill_after = if mode == "inline" { 150 } else { 2_000 + round * 1_500 };
        let mut inline = 0;
        for line in BufReader::new(stdout).lines() {
            let (n, k) = ack(&line.unwrap());
            (acked, inline) = (Some(n), k);
            if n >= kill_after {
                break;
            }
        }
        assert_eq!(inline > 0, mode == "inline", "{mode}: {inline} commits inline");
        // SIGKILL: no destructors, no flush.
        child.kill().unwrap();
        child.wait().unwrap();
        let acked = acked.expect("the writer acknowledged something");
        let s = FjallStore::open(d.path(), DataKey::new(&[7; 32]), 16 << 20).unwrap();
        for i in 0..=acked {
            let r = s.get(Table::Enrollments, &format!("dev{i:08}")).unwrap().unwrap_or_else(|| panic!("acknowledged write {i} lost"));
            assert_eq!(r.etag, format!("\"{i}\""));
            assert!(String::from_utf8(r.body).unwrap().starts_with(&format!("{{\"n\":{i},")));
        }
        // Everything present, acknowledged or not, decrypts and is whole, and every transaction
        // is all there: enrollment, registration state and its by-group index entry.
        let all = s.scan(Table::Enrollments, "", None, usize::MAX).unwrap();
        assert!(all.len() as u64 > acked);
        let registrations = s.scan(Table::Registrations, "", None, usize::MAX).unwrap();
        assert_eq!(registrations.len(), all.len(), "a transaction survived in part");
        for (k, r) in all {
            let n: u64 = k.strip_prefix("dev").unwrap().parse().unwrap();
            assert_eq!(r.etag, format!("\"{n}\""));
            let state = s.get(Table::Registrations, &k).unwrap().unwrap_or_else(|| panic!("transaction {n} half applied"));
            assert_eq!(state.etag, format!("\"r{n}\""));
            let index = by_group_key(&format!("g{}", n % 7), &k);
            assert!(s.get(Table::RegistrationsByGroup, &index).unwrap().is_some(), "index entry of {n} lost");
        }
        assert!(s.count(Table::Enrollments, 0) as u64 > acked);
        assert_eq!(s.count(Table::Registrations, 0), s.count(Table::Enrollments, 0));
    }
}

/// Runs the writer under strace and checks, in the order the kernel saw the calls, that each
/// `ack` line is written only when every journal write before it has been followed by a
/// completed fsync/fdatasync of that journal. With fjall's buffered persist mode (no sync
/// before the acknowledgement) this fails.
#[test]
fn no_write_is_acknowledged_before_its_journal_is_synced() {
    assert!(Command::new("strace").arg("-V").output().is_ok_and(|o| o.status.success()), "strace is needed (scripts/deps.sh)");
    // Group commits on the writer thread, and commits on the caller's thread.
    for mode in ["group", "inline"] {
        let d = tempfile::tempdir().unwrap();
        let trace = d.path().join("trace");
        let db = d.path().join("db");
        let mut child = Command::new("strace")
            .args(["-f", "-y", "-qq", "-e", "trace=write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync", "-o"])
            .arg(&trace)
            .arg(env!("CARGO_BIN_EXE_crash_writer"))
            .arg(&db)
            .arg(mode)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let want = if mode == "group" { 1_500 } else { 150 };
        let mut inline = 0;
        for line in BufReader::new(stdout).lines() {
            let (n, k) = ack(&line.unwrap());
            inline = k;
            if n >= want {
                break;
            }
        }
        assert_eq!(inline > 0, mode == "inline", "{mode}: {inline} commits inline");
        child.kill().unwrap();
        child.wait().unwrap();
        let text = std::fs::read_to_string(&trace).unwrap();
        let (acks, syncs) = check_sync_order(&text).unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(acks >= want as usize && syncs >= 10, "{mode}: {acks} acknowledgements and {syncs} syncs seen");
        if mode == "inline" {
            // One sync per acknowledgement: each commit was its own.
            assert!(syncs >= acks, "{mode}: {acks} acknowledgements, {syncs} syncs");
        }
    }
}

/// crash_writer's `ack {n} {inline commits so far}`.
fn ack(line: &str) -> (u64, u64) {
    let mut f = line.strip_prefix("ack ").unwrap().split(' ').map(|x| x.parse::<u64>().unwrap());
    (f.next().unwrap(), f.next().unwrap())
}

/// Returns (acknowledgements checked, journal syncs seen), or the first acknowledgement that
/// came before a sync of what preceded it. A sync covers the writes to its file that started
/// before the sync did, and counts once it has returned 0.
fn check_sync_order(trace: &str) -> Result<(usize, usize), String> {
    use std::collections::HashMap;
    let journal = |l: &str| -> Option<String> {
        let start = l.find('<')? + 1;
        let path = &l[start..start + l[start..].find('>')?];
        path.ends_with(".jnl").then(|| path.to_string())
    };
    // Per journal: writes started, and writes covered by a completed sync.
    let (mut written, mut synced) = (HashMap::<String, u64>::new(), HashMap::<String, u64>::new());
    let mut pending: HashMap<String, (String, u64)> = HashMap::new();
    let (mut acks, mut syncs) = (0, 0);
    for l in trace.lines() {
        let Some((pid, call)) = l.split_once(' ') else { continue };
        let call = call.trim_start();
        if call.starts_with("write(1<") && call.contains("\"ack ") {
            if let Some((j, _)) = written.iter().find(|(j, n)| synced.get(*j).copied().unwrap_or(0) < **n) {
                return Err(format!("acknowledged before {j} was synced: {l}"));
            }
            acks += 1;
        } else if call.starts_with("write(") || call.starts_with("pwrite") || call.starts_with("writev(") {
            if let Some(j) = journal(call) {
                *written.entry(j).or_default() += 1;
            }
        } else if call.starts_with("fsync(") || call.starts_with("fdatasync(") {
            if let Some(j) = journal(call) {
                let upto = written.get(&j).copied().unwrap_or(0);
                if call.contains("<unfinished") {
                    pending.insert(pid.to_string(), (j, upto));
                } else if call.ends_with("= 0") {
                    let s = synced.entry(j).or_default();
                    *s = (*s).max(upto);
                    syncs += 1;
                }
            }
        } else if call.starts_with("<... fsync resumed>") || call.starts_with("<... fdatasync resumed>") {
            if let (Some((j, upto)), true) = (pending.remove(pid), call.ends_with("= 0")) {
                let s = synced.entry(j).or_default();
                *s = (*s).max(upto);
                syncs += 1;
            }
        }
    }
    Ok((acks, syncs))
}

#[test]
fn the_sync_order_check_catches_an_early_acknowledgement() {
    let ack = "1 write(1</o>, \"ack 0\\n\", 6) = 6\n";
    let unfinished = format!("1 write(4</d/0.jnl>, \"x\", 1) = 1\n2 fsync(4</d/0.jnl> <unfinished ...>\n{ack}");
    assert!(check_sync_order(&unfinished).is_err(), "the sync had not completed");
    let ok = format!("1 write(4</d/0.jnl>, \"x\", 1) = 1\n2 fsync(4</d/0.jnl>) = 0\n{ack}");
    assert_eq!(check_sync_order(&ok), Ok((1, 1)));
    let resumed = format!("1 write(4</d/0.jnl>, \"x\", 1) = 1\n2 fsync(4</d/0.jnl> <unfinished ...>\n2 <... fsync resumed>) = 0\n{ack}");
    assert_eq!(check_sync_order(&resumed), Ok((1, 1)));
    let late = format!("2 fsync(4</d/0.jnl> <unfinished ...>\n1 write(4</d/0.jnl>, \"x\", 1) = 1\n2 <... fsync resumed>) = 0\n{ack}");
    assert!(check_sync_order(&late).is_err(), "a sync that started before the write does not cover it");
    let failed = format!("1 write(4</d/0.jnl>, \"x\", 1) = 1\n2 fsync(4</d/0.jnl>) = -1 EIO (Input/output error)\n{ack}");
    assert!(check_sync_order(&failed).is_err(), "a failed sync covers nothing");
}
