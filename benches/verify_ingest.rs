//! The ingest ceiling with verification: the release `contrail serve` (its own process, real
//! RocksDB with fsync, defaults) reads 30,000 signed commits from 3,000 repos (half K-256, half
//! P-256) as fast as the fake relay sends them, with `--verify off`, `signature` and `full`
//! in the same run; a PLC-style directory on loopback serves the DID documents (each resolved
//! once, cold: a fresh data dir per mode). Events/s = commits / (time to store the last one).
//! `cargo bench --bench verify_ingest` (prints a table; not a criterion bench).
//! The relay, the directory and the server share the machine's two cores.

#[path = "../tests/common/frames.rs"]
#[allow(dead_code)]
mod frames;
#[path = "../tests/common/process.rs"]
#[allow(dead_code)]
mod process;
#[path = "../tests/common/relay.rs"]
#[allow(dead_code)]
mod relay;
#[path = "../tests/common/signed.rs"]
#[allow(dead_code)]
mod signed;

#[path = "common/proc.rs"]
#[allow(dead_code)]
mod proc;

use proc::cpu_seconds;
use signed::{record, with_seq, Answer, Op, Plc, SignedRepo, Signer, Tamper};
use std::time::{Duration, Instant};

const COMMITS: i64 = 30_000;
const REPOS: usize = 3_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("verify_ingest: skipped outside `cargo bench`");
        return;
    }
    let plc = Plc::start().await;
    let relay = relay::FakeRelay::start().await;
    let mut repos: Vec<SignedRepo> = (0..REPOS)
        .map(|i| {
            let did = format!("did:plc:{:0>24}", format!("bench{i}"));
            let signer = if i % 2 == 0 { Signer::k256((i % 250) as u8 + 1) } else { Signer::p256((i % 250) as u8 + 1) };
            let r = SignedRepo::new(&did, signer);
            plc.set(&did, Answer::Doc(r.did_doc()));
            r
        })
        .collect();
    let t = Instant::now();
    for seq in 1..=COMMITS {
        let r = &mut repos[(seq as usize * 7919) % REPOS];
        let n = format!("{seq}");
        let frame = r.commit(0, &[Op::Create(format!("app.bsky.feed.post/{n}"), record(&n))], Tamper::None);
        relay.push(seq, with_seq(&frame, seq));
    }
    println!(
        "generated {COMMITS} signed commits over {REPOS} repos in {:.1} s; machine: {} cores shared by relay, directory and server",
        t.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("| --verify | commits/s (end to end, fsync) | server CPU | verified | failures |");
    println!("|---|---|---|---|---|");
    for round in 0..2 {
        for mode in ["off", "signature", "full"] {
            let dir = tempfile::tempdir().unwrap();
            let plc_url = plc.url();
            let flags = ["--verify", mode, "--plc-url", &plc_url];
            let started = Instant::now();
            let serve = process::Serve::start(dir.path(), &relay.url(), &flags);
            let pid = serve.child.id();
            serve.wait_for_seq(COMMITS, Duration::from_secs(600));
            let secs = started.elapsed().as_secs_f64();
            let cpu = cpu_seconds(pid);
            let verified = serve.metric("contrail_verify_commits_total{result=\"verified\"}").unwrap_or(0.0);
            let failed = serve.metric("contrail_verify_commits_total{result=\"failed\"}").unwrap_or(0.0)
                + serve.metric("contrail_verify_commits_total{result=\"unresolved\"}").unwrap_or(0.0);
            println!(
                "| {mode} (round {}) | {:.0} | {:.1} s for {COMMITS} ({:.2} cores) | {verified} | {failed} |",
                round + 1,
                COMMITS as f64 / secs,
                cpu,
                cpu / secs
            );
        }
    }
}
