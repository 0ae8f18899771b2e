//! Helpers run by hand (ignored in normal test runs).

mod common;

/// Writes generated relay frames as a frame file, for `contrail inspect frames` and
/// `contrail dict train` (see dictionaries/README.md):
/// `CONTRAIL_FRAMES_OUT=/tmp/frames.bin cargo test --test tools -- --ignored write_generated_frames`
#[test]
#[ignore]
fn write_generated_frames() {
    let out = std::env::var("CONTRAIL_FRAMES_OUT").expect("set CONTRAIL_FRAMES_OUT");
    let n: usize = std::env::var("CONTRAIL_FRAMES_COUNT").ok().and_then(|n| n.parse().ok()).unwrap_or(20_000);
    let gen = common::frames::generate(1, n, 5_000, 2026);
    let bytes = contrail::framefile::encode_frames(gen.iter().map(|g| g.frame.as_slice()));
    std::fs::write(&out, bytes).unwrap();
    eprintln!("wrote {n} frames to {out}");
}

/// A demo: a fake relay streaming generated frames into `contrail serve` on 127.0.0.1:6108
/// for `CONTRAIL_DEMO_SECONDS` (default 60), e.g. to look at the status page:
/// `cargo test --test tools -- --ignored --nocapture serve_demo`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn serve_demo() {
    let secs: u64 = std::env::var("CONTRAIL_DEMO_SECONDS").ok().and_then(|n| n.parse().ok()).unwrap_or(60);
    let relay = common::relay::FakeRelay::start().await;
    for g in common::frames::generate(1, 200_000, 2_000, 3) {
        relay.push(g.seq, g.frame);
    }
    relay.set_faults(common::relay::Faults {
        frame_interval: Some(std::time::Duration::from_millis(1)),
        burst: 1,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let serve = common::process::Serve::start(dir.path(), &relay.url(), &["--listen", "127.0.0.1:6108"]);
    eprintln!("status page: http://{}/ (metrics http://{}/metrics)", serve.public, serve.metrics);
    tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
}

/// Long commands show progress on a terminal and stay silent otherwise.
#[test]
fn inspect_frames_shows_progress_only_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("frames.bin");
    let gen = common::frames::generate(1, 2_000, 50, 7);
    std::fs::write(&file, contrail::framefile::encode_frames(gen.iter().map(|g| g.frame.as_slice()))).unwrap();
    let bin = common::process::bin();
    // Not a terminal: stdout is the JSON lines, stderr only the summary.
    let out = std::process::Command::new(bin).args(["inspect", "frames"]).arg(&file).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("frames 2000: "), "{err}");
    assert!(!err.contains('\r') && !err.contains("/s"), "progress written to a pipe: {err:?}");
    // A terminal (util-linux `script` gives the command a pty): the progress line appears.
    if std::process::Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIP the terminal half: no `script` command");
        return;
    }
    let cmd = format!("{bin} inspect frames {} > /dev/null", file.display());
    let out = std::process::Command::new("script").args(["-qefc", &cmd, "/dev/null"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(tty.contains("frames 2000/2000 (100%)") && tty.contains("/s") && tty.contains("done in"), "{tty:?}");
}
