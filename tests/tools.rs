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
