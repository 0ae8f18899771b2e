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
